// Ember fleet dashboard: the Models page (#/models), the model registry.
//
// Loaded after app.js (classic scripts share their top-level names): uses its `state`, `api`,
// `apiAll`, `esc`, `fmtTime`, `fmtNum`, `main` and `Unauthorized`; app.js's router calls
// `showModels()`. Lists every registered version (name, version, kind, precision, size,
// sha256, signer, deprecated), and for admin tokens uploads bundles and (un)deprecates versions;
// a read token sees the server's 403 message.
"use strict";

async function apiSend(method, path, body, contentType) {
  const resp = await fetch(path, {
    method,
    headers: { Authorization: "Bearer " + state.token, "Content-Type": contentType },
    body,
  });
  if (resp.status === 401) throw new Unauthorized("the token was refused");
  let json = null;
  try {
    json = await resp.json();
  } catch (_) {
    json = null;
  }
  if (!resp.ok) throw new Error((json && json.error && json.error.message) || `HTTP ${resp.status}`);
  return json;
}

function modelRow(e) {
  const dep = e.deprecated
    ? '<span class="badge offline">deprecated</span>'
    : '<span class="badge online">current</span>';
  const action = e.deprecated ? "Undeprecate" : "Deprecate";
  return `<tr>
    <td>${esc(e.name)}</td><td class="mono">${esc(e.version)}</td>
    <td>${esc(e.kind)}</td><td>${esc(e.precision)}</td>
    <td class="num">${fmtNum(e.size)}</td>
    <td class="mono" title="${esc(e.sha256)}">${esc(String(e.sha256).slice(0, 12))}…</td>
    <td class="mono">${esc(e.key_id)}</td>
    <td>${fmtTime(e.created_at)}</td>
    <td>${dep}</td>
    <td><button type="button" class="small" data-name="${esc(e.name)}" data-version="${esc(e.version)}"
      data-deprecated="${e.deprecated ? "false" : "true"}">${action}</button></td>
  </tr>`;
}

async function showModels() {
  const items = await apiAll("/api/v1/models?limit=1000", 10000);
  const names = new Set(items.map((e) => e.name));
  main().innerHTML = `
    <h1>Models</h1>
    <section class="panel">
      <h2>Upload a bundle</h2>
      <p class="muted">A signed <code>.bundle</code> file (see <code>ember-models sign</code>); the fleet
        verifies it against its trusted keys. Needs an admin token.</p>
      <form id="upload-form" class="filters">
        <label>Bundle file <input id="bundle-file" type="file" accept=".bundle,application/octet-stream" required></label>
        <button type="submit">Upload</button>
      </form>
      <p id="models-msg" hidden></p>
    </section>
    <section class="panel">
      <h2>${fmtNum(names.size)} models, ${fmtNum(items.length)} versions</h2>
      ${items.length ? `<div class="scroll"><table id="models">
        <thead><tr><th>Model</th><th>Version</th><th>Kind</th><th>Precision</th><th class="num">Bytes</th>
          <th>sha256</th><th>Signed by</th><th>Uploaded</th><th>State</th><th></th></tr></thead>
        <tbody>${items.map(modelRow).join("")}</tbody></table></div>`
        : '<p class="empty">No model is registered yet.</p>'}
    </section>`;
  // Looked up each time: a reload of the page replaces the element.
  const say = (text, bad) => {
    const msg = document.getElementById("models-msg");
    msg.textContent = text;
    msg.className = bad ? "error" : "muted";
    msg.hidden = false;
  };
  document.getElementById("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = document.getElementById("bundle-file").files[0];
    if (!file) return;
    try {
      const e = await apiSend("POST", "/api/v1/models", file, "application/vnd.ember.bundle");
      await showModels();
      say(`Registered ${e.name} ${e.version}.`, false);
    } catch (err) {
      if (err instanceof Unauthorized) throw err;
      say(`Upload refused: ${err.message}`, true);
    }
  });
  for (const b of document.querySelectorAll("#models button[data-name]")) {
    b.addEventListener("click", async () => {
      const path = `/api/v1/models/${encodeURIComponent(b.dataset.name)}/${encodeURIComponent(b.dataset.version)}/deprecate`;
      try {
        await apiSend("POST", path, JSON.stringify({ deprecated: b.dataset.deprecated === "true" }), "application/json");
        await showModels();
      } catch (err) {
        if (err instanceof Unauthorized) throw err;
        say(`Not changed: ${err.message}`, true);
      }
    });
  }
}

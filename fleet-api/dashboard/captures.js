// Ember fleet dashboard: the Captures page (#/captures), field capture and labelling.
//
// Loaded after app.js (classic scripts share their top-level names): uses its `state`, `api`,
// `esc`, `fmtTime`, `fmtNum`, `main`, `COLORS` and `Unauthorized`, and models.js's `apiSend`;
// app.js's router calls `showCaptures()`. Lists the windows agents captured (newest first)
// with a plot of each window's channels, the model's answer and why it was captured; with a
// `label` or `admin` token, a label can be chosen and saved per window (a read token sees the
// server's 403 message).
"use strict";

const labelCache = new Map();

// The labels a capture of this model version may take (its manifest's classes, or
// normal/anomaly); empty when the version is not registered (any label may be typed).
async function labelsOf(model, version) {
  const key = model + "@" + version;
  if (!labelCache.has(key)) {
    let labels = [];
    try {
      const m = (await api(`/api/v1/models/${encodeURIComponent(model)}/${encodeURIComponent(version)}`)).manifest;
      labels = m.output.kind === "classes" ? m.output.labels : ["normal", "anomaly"];
    } catch (e) {
      if (e instanceof Unauthorized) throw e;
    }
    labelCache.set(key, labels);
  }
  return labelCache.get(key);
}

// One window's channels as an SVG polyline each, scaled to the window's own range.
function windowPlot(c) {
  const w = 240, h = 60;
  const n = c.samples;
  let lo = Infinity, hi = -Infinity;
  for (const v of c.window) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  const span = hi - lo || 1;
  const lines = [];
  for (let ch = 0; ch < c.channels; ch++) {
    const pts = [];
    for (let i = 0; i < n; i++) {
      const v = c.window[ch * n + i];
      pts.push(`${((i / Math.max(1, n - 1)) * w).toFixed(1)},${(h - ((v - lo) / span) * h).toFixed(1)}`);
    }
    lines.push(`<polyline fill="none" stroke="${COLORS[ch % COLORS.length]}" stroke-width="1" points="${pts.join(" ")}"/>`);
  }
  return `<svg class="capture-plot" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img"
    aria-label="the captured window, ${c.channels} channels">${lines.join("")}</svg>`;
}

function answer(o) {
  if (o.kind === "class") {
    const p = o.probabilities ? Math.max(...o.probabilities) : null;
    return `${esc(o.label)}${p === null ? "" : ` (${(100 * p).toFixed(1)}%)`}`;
  }
  return `score ${Number(o.score).toFixed(3)}${o.anomalous ? ' <span class="badge anomaly">anomaly</span>' : ""}`;
}

async function captureRow(c) {
  const labels = await labelsOf(c.model, c.version);
  const current = c.label || "";
  const choice = labels.length
    ? `<select class="label-choice">${['<option value="">choose…</option>']
        .concat(labels.map((l) => `<option${l === current ? " selected" : ""}>${esc(l)}</option>`))
        .join("")}</select>`
    : `<input class="label-choice" value="${esc(current)}" maxlength="64" placeholder="label">`;
  const by = c.label ? `<br><span class="muted">${esc(c.labelled_by)}, ${fmtTime(c.labelled_at)}</span>` : "";
  return `<tr data-device="${esc(c.device)}" data-stream="${esc(c.stream)}" data-seq="${c.seq}">
    <td><a href="#/device/${encodeURIComponent(c.device)}">${esc(c.device)}</a><br><span class="muted">${fmtTime(c.ts)}</span></td>
    <td>${esc(c.model)} <span class="mono">${esc(c.version)}</span></td>
    <td>${esc(c.trigger.replace("_", " "))}</td>
    <td>${answer(c.output)}</td>
    <td>${windowPlot(c)}</td>
    <td><span class="current-label">${current ? esc(current) : '<span class="muted">none</span>'}</span>${by}</td>
    <td>${choice} <button type="button" class="small save-label">Save</button></td>
  </tr>`;
}

async function showCaptures() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const labelled = q.get("labelled") || "";
  const params = new URLSearchParams({ limit: "100" });
  if (labelled) params.set("labelled", labelled);
  const page = await api("/api/v1/captures?" + params);
  const rows = [];
  for (const c of page.items) rows.push(await captureRow(c));
  main().innerHTML = `
    <h1>Captures</h1>
    <section class="panel">
      <p class="muted">Windows the agents captured under their models' capture policies (an anomaly, a
        low-confidence answer, a random sample), with the model's answer. Labels given here (a
        <code>label</code> or <code>admin</code> token) are stored with who and when and exported to the
        data lake for retraining.</p>
      <form id="capture-filter" class="filters">
        <label>Show <select id="labelled">
          <option value=""${labelled === "" ? " selected" : ""}>all</option>
          <option value="false"${labelled === "false" ? " selected" : ""}>unlabelled</option>
          <option value="true"${labelled === "true" ? " selected" : ""}>labelled</option>
        </select></label>
      </form>
      <p id="captures-msg" hidden></p>
      ${rows.length ? `<div class="scroll"><table id="captures">
        <thead><tr><th>Device</th><th>Model</th><th>Trigger</th><th>Answer</th><th>Window</th><th>Label</th><th></th></tr></thead>
        <tbody>${rows.join("")}</tbody></table></div>` : '<p class="empty">No captures.</p>'}
    </section>`;
  document.getElementById("labelled").addEventListener("change", (ev) => {
    location.hash = "#/captures" + (ev.target.value ? "?labelled=" + ev.target.value : "");
  });
  const say = (text, bad) => {
    const msg = document.getElementById("captures-msg");
    msg.textContent = text;
    msg.className = bad ? "error" : "muted";
    msg.hidden = false;
  };
  for (const button of document.querySelectorAll("#captures .save-label")) {
    button.addEventListener("click", async () => {
      const tr = button.closest("tr");
      const value = tr.querySelector(".label-choice").value.trim();
      if (!value) return;
      const path = `/api/v1/captures/${encodeURIComponent(tr.dataset.device)}/${encodeURIComponent(tr.dataset.stream)}/${tr.dataset.seq}/label`;
      try {
        const r = await apiSend("PUT", path, JSON.stringify({ label: value }), "application/json");
        tr.querySelector(".current-label").textContent = value;
        tr.dataset.labelled = "true";
        say(`Labelled ${tr.dataset.device} #${tr.dataset.seq} "${value}" (${r.labelled_by}).`, false);
      } catch (e) {
        if (e instanceof Unauthorized) throw e;
        say(e.message, true);
      }
    });
  }
}

// Ember fleet dashboard: the Rollouts pages (#/rollouts, #/rollout/<id>).
//
// Loaded before app.js and called by its router; uses app.js's helpers (api, esc, fmtTime,
// main, state, showError). Progress is drawn with <progress> elements (the page's CSP allows
// no inline styles). The commands (pause, resume, abort, rollback) POST with the signed-in
// token: a read token gets the API's 403 message. Live: every `rollout` event on the event
// stream reloads the page's data (at most every 500 ms).
"use strict";

const ROLLOUT_COMMANDS = {
  pause: ["running"],
  resume: ["paused"],
  abort: ["running", "paused"],
  rollback: ["running", "paused", "completed"],
};

async function apiPost(path) {
  const resp = await fetch(path, { method: "POST", headers: { Authorization: "Bearer " + state.token } });
  if (resp.status === 401) throw new Unauthorized("the token was refused");
  const body = await resp.json();
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

function rolloutBadge(s) {
  const cls = { running: "online", completed: "online", paused: "anomaly", aborted: "offline", rolled_back: "anomaly" }[s] || "offline";
  return `<span class="badge ${cls}" data-rollout-state="${esc(s)}">${esc(s.replace("_", " "))}</span>`;
}

function countsText(c) {
  return Object.entries(c || {}).map(([k, n]) => `${esc(k)} ${n}`).join(", ");
}

function progressOf(active, size) {
  return `<progress max="${Math.max(size, 1)}" value="${size ? active : 1}"></progress> <span class="muted">${active}/${size}</span>`;
}

// Reloads `load` when a rollout event arrives, at most every 500 ms.
function liveReload(load, filter) {
  let timer = null;
  return {
    onEvent(type, data) {
      if (type !== "rollout" || (filter && !filter(data)) || timer) return;
      timer = setTimeout(async () => {
        timer = null;
        try { await load(); } catch (e) { showError(e); }
      }, 500);
    },
  };
}

async function showRollouts() {
  main().innerHTML = `<h1>Rollouts</h1><section class="panel"><div id="rollout-list" class="empty">Loading…</div></section>`;
  const load = async () => {
    const page = await api("/api/v1/rollouts?limit=100");
    const box = document.getElementById("rollout-list");
    if (!box) return;
    if (!page.items.length) {
      box.innerHTML = `No rollouts yet. Start one with <code>ember-fleet rollout create</code> or <code>POST /api/v1/rollouts</code>.`;
      return;
    }
    box.className = "";
    box.innerHTML = `<table><thead><tr><th>Rollout</th><th>Model</th><th>State</th><th>Wave</th><th>Active</th><th>Devices</th><th>Created</th></tr></thead><tbody>${
      page.items.map((r) => {
        const total = Object.values(r.counts).reduce((a, b) => a + b, 0);
        const wave = r.waves[r.current_wave] || {};
        return `<tr data-rollout="${esc(r.id)}"><td><a href="#/rollout/${encodeURIComponent(r.id)}">${esc(r.id)}</a></td>
          <td>${esc(r.model)} <span class="muted">${esc(r.version)}</span></td><td>${rolloutBadge(r.state)}</td>
          <td>${r.current_wave + 1}/${r.waves.length} <span class="muted">${esc(wave.name || "")}</span></td>
          <td>${progressOf(r.counts.active || 0, total)}</td><td class="muted">${countsText(r.counts)}</td><td>${fmtTime(r.created_at)}</td></tr>`;
      }).join("")}</tbody></table>`;
  };
  await load();
  state.view = liveReload(load);
}

async function showRollout(id) {
  main().innerHTML = `<p><a href="#/rollouts">← Rollouts</a></p><div id="rollout-detail">Loading…</div>`;
  const load = async () => {
    const [r, events] = await Promise.all([
      api(`/api/v1/rollouts/${encodeURIComponent(id)}`),
      api(`/api/v1/rollouts/${encodeURIComponent(id)}/events`),
    ]);
    const box = document.getElementById("rollout-detail");
    if (!box) return;
    const buttons = Object.entries(ROLLOUT_COMMANDS)
      .map(([cmd, states]) => `<button type="button" data-command="${cmd}"${states.includes(r.state) ? "" : " disabled"}>${cmd[0].toUpperCase() + cmd.slice(1)}</button>`)
      .join(" ");
    const shadow = r.shadow ? `${r.shadow.windows} windows, agreement ≥ ${r.shadow.min_agreement}, latency ratio ≤ ${r.shadow.max_latency_ratio}` : "none";
    box.innerHTML = `<h1>Rollout ${esc(r.id)} ${rolloutBadge(r.state)}</h1>
      <section class="panel"><dl class="kv">
        <dt>Model</dt><dd>${esc(r.model)} ${esc(r.version)}</dd>
        <dt>Created</dt><dd>${fmtTime(r.created_at)}</dd>
        ${r.pause_reason ? `<dt>Paused</dt><dd class="error">${esc(r.pause_reason)}</dd>` : ""}
        <dt>Shadow</dt><dd>${esc(shadow)}</dd>
        <dt>Devices</dt><dd>${countsText(r.counts)}</dd>
        <dt>Not yet published</dt><dd>${r.pending_publish}</dd>
      </dl>
      <p class="commands">${buttons}</p><p id="command-error" class="error" hidden></p></section>
      <section class="panel"><h2>Waves</h2><table><thead><tr><th>#</th><th>Wave</th><th>Devices</th><th>Active</th><th>States</th><th>Started</th><th>Succeeded</th></tr></thead><tbody>${
        r.waves.map((w, i) => `<tr data-wave="${i}"${i === r.current_wave ? ' class="current"' : ""}><td>${i + 1}</td><td>${esc(w.name)}</td><td class="num">${w.size}</td>
          <td>${progressOf(w.counts.active || 0, w.size)}</td><td class="muted">${countsText(w.counts)}</td>
          <td>${fmtTime(w.started_at)}</td><td>${fmtTime(w.succeeded_at)}</td></tr>`).join("")}</tbody></table></section>
      <div class="grid two">
        <section class="panel"><h2>Devices</h2><div class="scroll"><table><thead><tr><th>Device</th><th>Wave</th><th>State</th><th>Previous</th><th>Updated</th></tr></thead><tbody>${
          (r.devices || []).map((d) => `<tr data-device="${esc(d.device_id)}"><td><a href="#/device/${encodeURIComponent(d.device_id)}">${esc(d.device_id)}</a></td>
            <td>${d.wave + 1}</td><td>${esc(d.state)}${d.reason ? ` <span class="error">${esc(d.reason)}</span>` : ""}</td>
            <td class="muted">${esc(d.previous_version ?? "—")}</td><td>${fmtTime(d.updated_at)}</td></tr>`).join("")}</tbody></table></div></section>
        <section class="panel"><h2>History</h2><div class="scroll"><table><tbody>${
          events.items.slice().reverse().map((e) => `<tr><td>${fmtTime(e.at)}</td><td>${esc(e.kind)}</td><td>${esc(e.detail)}</td></tr>`).join("")}</tbody></table></div></section>
      </div>`;
    for (const b of box.querySelectorAll("button[data-command]")) {
      b.addEventListener("click", async () => {
        const err = document.getElementById("command-error");
        err.hidden = true;
        b.disabled = true;
        try {
          await apiPost(`/api/v1/rollouts/${encodeURIComponent(id)}/${b.dataset.command}`);
          await load();
        } catch (e) {
          if (e instanceof Unauthorized) { showError(e); return; }
          err.textContent = e.message;
          err.hidden = false;
          b.disabled = false;
        }
      });
    }
  };
  await load();
  state.view = liveReload(load, (d) => d.rollout_id === id);
}

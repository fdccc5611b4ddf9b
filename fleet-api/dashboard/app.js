// Ember fleet dashboard: plain JavaScript, no dependencies, no build step.
//
// Views (hash routes): #/ overview, #/devices?state=&tag=&model=&search=, #/device/<id>,
// #/rollouts and #/rollout/<id> (rollouts.js).
// Data: the REST API under /api/v1 with `Authorization: Bearer <token>`; live updates from
// /api/v1/events (server-sent events, read with fetch so that the token travels in a header,
// never in a URL). The token lives in sessionStorage for this tab only; a token passed as
// `#token=...` in the address is moved there and removed from the address at once.
"use strict";

const TOKEN_KEY = "ember-fleet-token";
const COLORS = ["#2f6fde", "#f08a24", "#1a7f37", "#8250df", "#bf3989", "#0a7ea4"];
const MAX_POINTS = 300;
const MAX_ROWS = 50;

const state = {
  token: null,
  view: null,          // the current view's live handler: { onEvent(type, data) }
  live: null,          // AbortController of the event stream
  rate: null,
};

// ---- helpers ---------------------------------------------------------------------------

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmtTime(us) {
  if (us === null || us === undefined) return "—";
  const d = new Date(Number(us) / 1000);
  if (isNaN(d.getTime())) return "—";
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function fmtAgo(us) {
  if (!us) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - Number(us) / 1e6));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

// One formatter per precision: creating one per call (toLocaleString) dominated the device
// page's time at demo rates.
const NUMBER_FORMATS = {};

function fmtNum(v, digits) {
  if (v === null || v === undefined) return "—";
  const d = digits ?? 0;
  const f = NUMBER_FORMATS[d] || (NUMBER_FORMATS[d] = new Intl.NumberFormat("en-US", { maximumFractionDigits: d }));
  return f.format(Number(v));
}

function badge(online) {
  return online ? '<span class="badge online">online</span>' : '<span class="badge offline">offline</span>';
}

function modelsText(models) {
  const e = Object.entries(models || {});
  return e.length ? e.map(([m, v]) => `<span class="tag">${esc(m)} ${esc(v)}</span>`).join("") : '<span class="muted">none</span>';
}

function tagsText(tags) {
  const e = Object.entries(tags || {});
  return e.length ? e.map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join("") : "";
}

// One rendering for a result, whether it came from the REST API or a live event (both carry
// the same fields), so a row reads the same either way.
function outputText(r) {
  if (r.output_kind === "class") {
    const p = r.probabilities && r.class !== null && r.class !== undefined ? r.probabilities[r.class] : null;
    return `${esc(r.label)} <span class="muted">(${p !== null && p !== undefined ? fmtNum(p * 100, 1) + "%" : "—"})</span>`;
  }
  const cls = r.anomalous ? "anomaly" : "normal";
  return `score ${fmtNum(r.score, 3)} / ${fmtNum(r.threshold, 3)} <span class="badge ${cls}">${r.anomalous ? "anomaly" : "normal"}</span>`;
}

class Unauthorized extends Error {}

async function api(path) {
  const resp = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
  if (resp.status === 401) throw new Unauthorized("the token was refused");
  const body = await resp.json();
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

async function apiAll(path, max) {
  let items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(path + (cursor ? `${sep}cursor=${encodeURIComponent(cursor)}` : ""));
    items = items.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

function main() {
  return document.getElementById("main");
}

function showError(e) {
  if (e instanceof Unauthorized) {
    signOut();
    return;
  }
  main().innerHTML = `<div class="panel error">Could not load this page: ${esc(e.message)}</div>`;
}

// ---- authentication ----------------------------------------------------------------------

function takeTokenFromFragment() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (!m) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  // Drop the token from the address bar and the history entry at once.
  history.replaceState(null, "", location.pathname + location.search + "#/");
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  stopLive();
  route();
}

function showLogin(message) {
  document.getElementById("signout").hidden = true;
  const tpl = document.getElementById("login-tpl");
  main().replaceChildren(tpl.content.cloneNode(true));
  const err = document.getElementById("login-error");
  if (message) {
    err.textContent = message;
    err.hidden = false;
  }
  document.getElementById("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = document.getElementById("token").value.trim();
    state.token = token;
    try {
      await api("/api/v1/overview");
    } catch (e) {
      state.token = null;
      err.textContent = e instanceof Unauthorized ? "This token was refused." : e.message;
      err.hidden = false;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    route();
  });
}

// ---- live events -------------------------------------------------------------------------

function setLive(on) {
  const el = document.getElementById("live");
  el.className = "live " + (on ? "on" : "off");
  el.textContent = on ? "live" : "offline";
}

function stopLive() {
  if (state.live) state.live.abort();
  state.live = null;
  setLive(false);
}

async function startLive() {
  if (state.live) return;
  const ctrl = new AbortController();
  state.live = ctrl;
  let delay = 500;
  while (!ctrl.signal.aborted) {
    try {
      const resp = await fetch("/api/v1/events", {
        headers: { Authorization: "Bearer " + state.token, Accept: "text/event-stream" },
        signal: ctrl.signal,
      });
      if (resp.status === 401) {
        signOut();
        return;
      }
      if (!resp.ok || !resp.body) throw new Error("event stream: HTTP " + resp.status);
      setLive(true);
      delay = 500;
      await readEvents(resp.body, ctrl.signal);
    } catch (e) {
      if (ctrl.signal.aborted) return;
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

async function readEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  while (!signal.aborted) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, at);
      buf = buf.slice(at + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      let parsed;
      try {
        parsed = JSON.parse(data.join("\n"));
      } catch (e) {
        continue;
      }
      dispatch(type, parsed);
    }
  }
}

function dispatch(type, data) {
  if (type === "ingest") state.rate = data;
  if (state.view && state.view.onEvent) state.view.onEvent(type, data);
}

// ---- charts (canvas, hand-drawn) ----------------------------------------------------------

// series: [{ points: [[x, y], ...], color, dots: bool, marks: [[x, y], ...] (drawn red) }]
function drawChart(canvas, series, opts) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600;
  const h = canvas.clientHeight || 200;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pad = { l: 52, r: 12, t: 10, b: 24 };
  const all = series.flatMap((s) => s.points.concat(s.marks || []));
  if (opts.hline !== undefined && opts.hline !== null) all.push([all.length ? all[0][0] : 0, opts.hline]);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#667085";
  if (!all.length) {
    g.fillText("no data yet", w / 2 - 30, h / 2);
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0]));
  let x1 = Math.max(...all.map((p) => p[0]));
  let y0 = opts.ymin !== undefined ? opts.ymin : Math.min(...all.map((p) => p[1]));
  let y1 = opts.ymax !== undefined ? opts.ymax : Math.max(...all.map((p) => p[1]));
  if (x1 === x0) { x0 -= 1e6; x1 += 1e6; }
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  g.strokeStyle = "#eaeef2";
  g.lineWidth = 1;
  // Categorical charts label their categories; numeric ones get five gridlines.
  const ticks = opts.yTicks || [0, 1, 2, 3, 4].map((i) => {
    const y = y0 + ((y1 - y0) * i) / 4;
    return [y, fmtNum(y, 2)];
  });
  for (const [y, label] of ticks) {
    g.beginPath();
    g.moveTo(pad.l, Y(y));
    g.lineTo(w - pad.r, Y(y));
    g.stroke();
    const text = String(label);
    g.fillText(text.length > 9 ? text.slice(0, 8) + "…" : text, 4, Y(y) + 4);
  }
  const t0 = new Date(x0 / 1000).toISOString().slice(11, 19);
  const t1 = new Date(x1 / 1000).toISOString().slice(11, 19);
  g.fillText(t0, pad.l, h - 6);
  g.fillText(t1, w - pad.r - g.measureText(t1).width, h - 6);
  if (opts.hline !== undefined && opts.hline !== null) {
    g.strokeStyle = "#9aa4ae";
    g.setLineDash([4, 4]);
    g.beginPath();
    g.moveTo(pad.l, Y(opts.hline));
    g.lineTo(w - pad.r, Y(opts.hline));
    g.stroke();
    g.setLineDash([]);
  }
  for (const s of series) {
    g.strokeStyle = s.color;
    g.fillStyle = s.color;
    g.lineWidth = 1.5;
    if (s.dots) {
      for (const [x, y] of s.points) {
        g.beginPath();
        g.arc(X(x), Y(y), 3, 0, 2 * Math.PI);
        g.fill();
      }
    } else {
      // A gap (no point for longer than opts.gapUs) breaks the line instead of bridging it.
      g.beginPath();
      s.points.forEach(([x, y], i) => {
        const gap = i > 0 && opts.gapUs && x - s.points[i - 1][0] > opts.gapUs;
        if (i === 0 || gap) g.moveTo(X(x), Y(y));
        else g.lineTo(X(x), Y(y));
      });
      g.stroke();
    }
    g.fillStyle = "#cf222e";
    for (const [x, y] of s.marks || []) {
      g.beginPath();
      g.arc(X(x), Y(y), 4, 0, 2 * Math.PI);
      g.fill();
    }
  }
}

// ---- overview ----------------------------------------------------------------------------

// What an anomaly model calls normal, from its registered manifest: "model version" -> labels.
const normalLabels = {};

async function loadNormalLabels(models) {
  const wanted = models.filter((m) => !(`${m.model} ${m.version}` in normalLabels));
  if (!wanted.length) return;
  // Only registered anomaly models have a manifest to read; the rest have nothing to say.
  const registered = new Set((await apiAll("/api/v1/models?limit=1000", 10000))
    .filter((e) => e.kind === "anomaly").map((e) => `${e.name} ${e.version}`));
  await Promise.all(wanted.map(async (m) => {
    const key = `${m.model} ${m.version}`;
    normalLabels[key] = null;
    if (!registered.has(key)) return;
    const d = await api(`/api/v1/models/${encodeURIComponent(m.model)}/${encodeURIComponent(m.version)}`);
    const out = (d.manifest && d.manifest.output) || {};
    if (out.kind === "anomaly_score") normalLabels[key] = out.normal_labels || [];
  }));
}

function anomalyModelsText(models) {
  const lines = models
    .filter((m) => normalLabels[`${m.model} ${m.version}`])
    .map((m) => {
      const labels = normalLabels[`${m.model} ${m.version}`];
      return `<b>${esc(m.model)} ${esc(m.version)}</b> learned what ${labels.map(esc).join(" and ")} look like;
        a window that does not look like them scores above its threshold and is anomalous`;
    });
  return lines.length
    ? `<p class="muted note" id="anomaly-note">${lines.join(". ")}. Consecutive anomalous windows of a device form one incident.</p>`
    : `<p class="muted note" id="anomaly-note">Consecutive anomalous windows of a device form one incident.</p>`;
}

function fmtDuration(us) {
  const s = Math.max(0, Math.round(Number(us) / 1e6));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function incidentRow(i) {
  const dev = encodeURIComponent(i.device_id);
  const seen = i.labels.length
    ? i.labels.map((l) => `${esc(l.label)} <span class="muted">×${fmtNum(l.windows)}</span>`).join(", ")
    : '<span class="muted">—</span>';
  return `<tr data-incident="${esc(i.device_id)}|${esc(i.stream)}|${i.first_seq}">
    <td><a href="#/device/${dev}">${esc(i.device_id)}</a></td>
    <td>${esc(i.model)} <span class="muted">${esc(i.version)}</span></td>
    <td title="${fmtTime(i.start)}">${fmtTime(i.start).slice(11, 19)}</td>
    <td>${i.ongoing ? '<span class="badge anomaly">ongoing</span> ' : ""}${fmtDuration(i.end - i.start)}</td>
    <td class="num">${fmtNum(i.windows)}</td>
    <td class="num">${fmtNum(i.peak_score, 3)} <span class="muted">/ ${fmtNum(i.threshold, 3)}</span></td>
    <td>${seen}</td></tr>`;
}

function rateRow(r) {
  const pct = r.rate * 100;
  return `<tr><td><a href="#/device/${encodeURIComponent(r.device_id)}">${esc(r.device_id)}</a></td>
    <td><meter class="rate" min="0" max="1" low="0.2" high="0.5" optimum="0" value="${r.rate}"></meter></td>
    <td class="num" title="${fmtNum(r.anomalies)} of ${fmtNum(r.windows)} windows">${fmtNum(pct, 1)}%</td></tr>`;
}

function incidentsHtml(incidents) {
  return incidents.items.length
    ? `<table id="incidents"><thead><tr><th>Device</th><th>Model</th><th>Start</th><th>Duration</th>
        <th class="num" title="Anomalous windows in a row">Windows</th><th class="num" title="Highest score / the model's threshold">Peak score</th>
        <th title="What the device's activity classifier said about the same windows">Activity seen</th></tr></thead>
        <tbody>${incidents.items.map(incidentRow).join("")}</tbody></table>`
    : '<div class="empty" id="no-anomalies">No anomalies in the last hour.</div>';
}

function ratesHtml(rates) {
  return rates.items.length
    ? `<table id="rates"><thead><tr><th>Device</th><th></th><th class="num">Anomalous</th></tr></thead>
        <tbody>${rates.items.map(rateRow).join("")}</tbody></table>`
    : '<div class="empty">No anomaly model results in the last hour.</div>';
}

async function showOverview() {
  const [ov, incidents, rates] = await Promise.all([
    api("/api/v1/overview"),
    api("/api/v1/anomalies/incidents?limit=20"),
    api("/api/v1/anomalies/rates"),
  ]);
  await loadNormalLabels(ov.models);
  const rejects = ov.rejects.reduce((n, r) => n + r.count, 0);
  main().innerHTML = `
    <h1>Fleet overview</h1>
    <div class="grid cards">
      <div class="card"><div class="label">Devices online</div>
        <div class="value ok" id="ov-online">${fmtNum(ov.online)}</div>
        <div class="sub"><span id="ov-offline">${fmtNum(ov.offline)}</span> offline, ${fmtNum(ov.devices)} registered</div></div>
      <div class="card"><div class="label">Ingest rate</div>
        <div class="value" id="ov-rate">${state.rate ? fmtNum(state.rate.records_per_s, 1) : "—"}</div>
        <div class="sub">records/s; <span id="ov-stored">${fmtNum(ov.records_stored)}</span> stored since start</div></div>
      <div class="card"><div class="label">Lost records</div>
        <div class="value ${ov.lost_records ? "bad" : "ok"}" id="ov-lost">${fmtNum(ov.lost_records)}</div>
        <div class="sub">unexplained gaps in the durability ledger</div></div>
      <div class="card"><div class="label">Rejected messages</div>
        <div class="value ${rejects ? "bad" : ""}" id="ov-rejects">${fmtNum(rejects)}</div>
        <div class="sub">since the counters' retention</div></div>
    </div>
    <div class="grid three">
      <section class="panel span2"><h2>Anomaly incidents <span class="muted">(last hour)</span></h2>
        ${anomalyModelsText(ov.models)}
        <div class="scroll" id="incidents-box">${incidentsHtml(incidents)}</div></section>
      <section class="panel"><h2>Anomaly rate per device <span class="muted">(last hour)</span></h2>
        <div id="rates-box">${ratesHtml(rates)}</div></section>
      <section class="panel"><h2>Model versions in use</h2>
        <table><thead><tr><th>Model</th><th>Version</th><th class="num">Devices</th></tr></thead><tbody>
        ${ov.models.map((m) => `<tr><td>${esc(m.model)}</td><td class="mono">${esc(m.version)}</td><td class="num">${m.devices}</td></tr>`).join("")}
        </tbody></table>${ov.models.length ? "" : '<div class="empty">No device reported a model.</div>'}</section>
      <section class="panel"><h2>Alerts: lost records</h2>
        <table><thead><tr><th>Device</th><th class="num">Lost</th></tr></thead><tbody>
        ${ov.devices_with_losses.map((d) => `<tr><td><a href="#/device/${encodeURIComponent(d.device_id)}">${esc(d.device_id)}</a></td><td class="num lost">${fmtNum(d.lost_count)}</td></tr>`).join("")}
        </tbody></table>${ov.devices_with_losses.length ? "" : '<div class="empty">Every captured record is stored or explained.</div>'}</section>
      <section class="panel"><h2>Rejects by reason</h2>
        <table id="rejects"><thead><tr><th>Reason</th><th class="num">Messages</th></tr></thead><tbody>
        ${ov.rejects.map((r) => `<tr><td class="mono">${esc(r.reason)}</td><td class="num">${fmtNum(r.count)}</td></tr>`).join("")}
        </tbody></table>${ov.rejects.length ? "" : '<div class="empty">No rejected messages.</div>'}</section>
    </div>`;
  let rejectTotal = rejects;
  let refreshPending = false;
  let anomaliesPending = false;
  const view = {
    onEvent(type, d) {
      if (state.view !== view) return;
      if (type === "ingest") {
        document.getElementById("ov-rate").textContent = fmtNum(d.records_per_s, 1);
        document.getElementById("ov-stored").textContent = fmtNum(d.records_stored);
      } else if (type === "inference" && d.output_kind === "anomaly" && !anomaliesPending) {
        // Incidents and rates follow the results: re-read them at once, then at most every 3 s.
        anomaliesPending = true;
        refreshAnomalies(view).finally(() => setTimeout(() => (anomaliesPending = false), 3000));
      } else if (type === "reject") {
        rejectTotal += d.count;
        const el = document.getElementById("ov-rejects");
        el.textContent = fmtNum(rejectTotal);
        el.className = "value bad";
      } else if (type === "device" && !refreshPending) {
        // Coalesce a burst of state changes into one overview request.
        refreshPending = true;
        setTimeout(() => {
          refreshPending = false;
          refreshCounts();
        }, 1000);
      }
    },
  };
  state.view = view;
}

async function refreshAnomalies(view) {
  try {
    const [incidents, rates] = await Promise.all([
      api("/api/v1/anomalies/incidents?limit=20"),
      api("/api/v1/anomalies/rates"),
    ]);
    if (state.view !== view) return;
    document.getElementById("incidents-box").innerHTML = incidentsHtml(incidents);
    document.getElementById("rates-box").innerHTML = ratesHtml(rates);
  } catch (e) {
    // The next event tries again.
  }
}

async function refreshCounts() {
  try {
    const ov = await api("/api/v1/overview");
    const on = document.getElementById("ov-online");
    if (!on) return;
    on.textContent = fmtNum(ov.online);
    document.getElementById("ov-offline").textContent = fmtNum(ov.offline);
  } catch (e) {
    // The next event or a reload will try again.
  }
}

// ---- device list -------------------------------------------------------------------------

function hashParams() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

async function showDevices() {
  const p = hashParams();
  const st = p.get("state") || "";
  const tag = p.get("tag") || "";
  const model = p.get("model") || "";
  const search = p.get("search") || "";
  const q = new URLSearchParams({ limit: "1000" });
  if (st) q.set("online", st === "online" ? "true" : "false");
  if (tag) q.set("tag", tag);
  if (search) q.set("search", search);
  const [devices, ov] = await Promise.all([apiAll("/api/v1/devices?" + q, 10000), api("/api/v1/overview")]);
  const models = [...new Set(ov.models.map((m) => `${m.model} ${m.version}`))];
  const shown = devices.filter((d) => !model || Object.entries(d.models || {}).some(([m, v]) => `${m} ${v}` === model || m === model));
  main().innerHTML = `
    <h1>Devices</h1>
    <form class="filters" id="filters">
      <label>State<select name="state"><option value="">any</option>
        <option value="online"${st === "online" ? " selected" : ""}>online</option>
        <option value="offline"${st === "offline" ? " selected" : ""}>offline</option></select></label>
      <label>Tag<input name="tag" placeholder="key or key=value" value="${esc(tag)}"></label>
      <label>Model<select name="model"><option value="">any</option>
        ${models.map((m) => `<option${m === model ? " selected" : ""}>${esc(m)}</option>`).join("")}</select></label>
      <label>Device id<input name="search" placeholder="contains" value="${esc(search)}"></label>
      <button type="submit">Apply</button>
    </form>
    <section class="panel"><table id="devices"><thead><tr><th>Device</th><th>State</th><th>Models</th><th>Agent</th>
      <th>Last seen</th><th class="num">Queued</th><th>Tags</th></tr></thead>
      <tbody>${shown.map(deviceRow).join("")}</tbody></table>
      ${shown.length ? "" : '<div class="empty">No device matches.</div>'}
      <div class="legend">${shown.length} of ${devices.length} devices</div></section>`;
  document.getElementById("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const out = new URLSearchParams();
    for (const [k, v] of f.entries()) if (String(v).trim()) out.set(k, String(v).trim());
    location.hash = "#/devices" + (out.toString() ? "?" + out : "");
  });
  state.view = {
    onEvent(type, d) {
      if (type !== "device") return;
      const row = document.querySelector(`#devices tr[data-device="${CSS.escape(d.device_id)}"]`);
      if (row) row.cells[1].innerHTML = badge(d.online);
    },
  };
}

function deviceRow(d) {
  const id = encodeURIComponent(d.device_id);
  return `<tr data-device="${esc(d.device_id)}"><td><a href="#/device/${id}">${esc(d.device_id)}</a></td><td>${badge(d.online)}</td>
    <td>${modelsText(d.models)}</td><td class="mono">${esc(d.agent_version || "—")}</td><td>${fmtAgo(d.last_seen)}</td>
    <td class="num">${fmtNum(d.queue.records)}</td><td>${tagsText(d.tags)}</td></tr>`;
}

// ---- device page -------------------------------------------------------------------------

async function showDevice(id) {
  const enc = encodeURIComponent(id);
  const [d, streams, ledger] = await Promise.all([
    api(`/api/v1/devices/${enc}`),
    api(`/api/v1/devices/${enc}/streams`),
    api(`/api/v1/devices/${enc}/ledger`),
  ]);
  const kinds = Object.fromEntries(ledger.streams.map((s) => [s.stream, s.kind]));
  // Each stream's schema (its channel count), shown beside its kind in the ledger.
  const schemas = Object.fromEntries(streams.items.map((s) => [s.stream, s.channels]));
  const inferenceStreams = streams.items.filter((s) => kinds[s.stream] === "inference").map((s) => s.stream);
  const telemetryStreams = streams.items.filter((s) => kinds[s.stream] !== "inference").map((s) => s.stream);
  // The charts show the recent past (results read oldest first, so a short look-back keeps
  // the first page current); telemetry is read by fetchTelemetry below.
  const since = Date.now() * 1000 - 300e6;
  const results = {};
  await Promise.all(inferenceStreams.map(async (s) => {
    results[s] = (await api(`/api/v1/devices/${enc}/streams/${encodeURIComponent(s)}/inference?from=${since}&limit=1000`)).items;
  }));
  main().innerHTML = `
    <h1>${esc(d.device_id)} <span id="dev-state">${badge(d.online)}</span></h1>
    <div class="grid two">
      <section class="panel"><h2>Device</h2><dl class="kv">
        <dt>Agent</dt><dd class="mono">${esc(d.agent_version || "—")}</dd>
        <dt>Models</dt><dd>${modelsText(d.models)}</dd>
        <dt>Last seen</dt><dd id="dev-seen">${fmtTime(d.last_seen)}</dd>
        <dt>Uptime</dt><dd>${d.uptime_s === null ? "—" : fmtNum(d.uptime_s) + " s"}</dd>
        <dt>Queue</dt><dd>${fmtNum(d.queue.records)} records, ${fmtNum(d.queue.bytes)} bytes</dd>
        <dt>Tags</dt><dd>${tagsText(d.tags) || '<span class="muted">none</span>'}</dd></dl></section>
      <section class="panel"><h2>Durability ledger</h2>
        <table id="ledger"><thead><tr><th>Stream</th><th>Kind</th>
        <th class="num" title="${esc(LEDGER_HELP.captured)}">Captured</th><th class="num" title="${esc(LEDGER_HELP.received)}">Received</th>
        <th class="num" title="${esc(LEDGER_HELP.duplicates)}">Duplicates</th><th class="num" title="${esc(LEDGER_HELP.evicted)}">Evicted</th>
        <th class="num" title="${esc(LEDGER_HELP.pending)}">Pending</th><th class="num" title="${esc(LEDGER_HELP.lost)}">Lost</th></tr></thead>
        <tbody>${ledgerRows(ledger, schemas)}</tbody></table>
        ${ledger.streams.length ? "" : '<div class="empty">No streams yet.</div>'}
        <p class="muted note" id="ledger-note">${ledgerNote(ledger)}</p></section>
    </div>
    <div id="inference-panels"></div>
    <div id="telemetry-panels"></div>`;

  const views = {};
  const addInference = (s) => {
    const i = Object.keys(views).length;
    document.getElementById("inference-panels").insertAdjacentHTML("beforeend", `
      <section class="panel" data-inference="${esc(s)}"><h2>Inference: <span class="mono">${esc(s)}</span></h2>
        <canvas class="chart" id="chart-i${i}"></canvas><div class="legend" id="legend-i${i}"></div>
        <div class="scroll"><table class="results"><thead><tr><th>Time</th><th class="num">Seq</th><th>Model</th><th>Result</th><th class="num">Latency</th></tr></thead>
        <tbody></tbody></table></div></section>`);
    const panel = document.querySelector(`[data-inference="${CSS.escape(s)}"]`);
    views["i:" + s] = { kind: "inference", rows: (results[s] || []).slice(-MAX_POINTS), panel, canvas: document.getElementById(`chart-i${i}`), legend: document.getElementById(`legend-i${i}`) };
  };
  const addTelemetry = (s) => {
    const i = Object.keys(views).length;
    document.getElementById("telemetry-panels").insertAdjacentHTML("beforeend", `
      <section class="panel" data-telemetry="${esc(s)}"><h2>Telemetry: <span class="mono">${esc(s)}</span></h2>
        <canvas class="chart" id="chart-t${i}"></canvas><div class="legend" id="legend-t${i}"></div>
        <table class="recent"><thead><tr><th>Time</th><th class="num">Seq</th><th>Values</th></tr></thead><tbody></tbody></table></section>`);
    const panel = document.querySelector(`[data-telemetry="${CSS.escape(s)}"]`);
    const v = { kind: "telemetry", rows: [], panel, canvas: document.getElementById(`chart-t${i}`), legend: document.getElementById(`legend-t${i}`) };
    views["t:" + s] = v;
    fetchTelemetry(v, enc, s);
  };
  // The ledger follows the records: re-read it at most every 3 s while events arrive.
  let ledgerPending = false;
  const refreshLedger = () => {
    if (ledgerPending) return;
    ledgerPending = true;
    setTimeout(async () => {
      ledgerPending = false;
      try {
        const l = await api(`/api/v1/devices/${enc}/ledger`);
        const body = document.querySelector("#ledger tbody");
        if (body) body.innerHTML = ledgerRows(l, schemas);
        const note = document.getElementById("ledger-note");
        if (note) note.innerHTML = ledgerNote(l);
      } catch (e) {
        // The next event tries again.
      }
    }, 3000);
  };
  inferenceStreams.forEach(addInference);
  telemetryStreams.forEach(addTelemetry);
  Object.values(views).forEach(render);

  state.view = {
    onEvent(type, e) {
      if (type === "device" && e.device_id === id) {
        document.getElementById("dev-state").innerHTML = badge(e.online);
        return;
      }
      if ((type !== "inference" && type !== "telemetry") || e.device_id !== id) return;
      const key = (type === "inference" ? "i:" : "t:") + e.stream;
      if (!views[key]) (type === "inference" ? addInference : addTelemetry)(e.stream);
      const v = views[key];
      document.getElementById("dev-seen").textContent = fmtTime(Date.now() * 1000);
      refreshLedger();
      if (type === "telemetry") {
        // A telemetry event carries only the newest record of a stored batch: read the
        // records since the newest shown from the API, so the chart and table miss none.
        fetchTelemetry(v, enc, e.stream);
        return;
      }
      if (v.rows.some((r) => r.seq === e.seq)) return;
      v.rows.push(e);
      v.rows.sort((a, b) => a.seq - b.seq);
      if (v.rows.length > MAX_POINTS) v.rows.shift();
      v.fresh = true;
      scheduleRender(v);
    },
  };
}

const LEDGER_HELP = {
  captured: "Records the agent captured on this stream (its last sequence number), as of its last status message.",
  received: "Distinct records the fleet has stored, counted now. Records sent after the last status make it run ahead of Captured until the next status.",
  duplicates: "Copies of already stored records that arrived again (re-sent after a reconnect) and were ignored.",
  evicted: "Records the agent deleted on purpose before sending them (queue full, too old, disk full, corrupt) or that the fleet refused, as the agent reported.",
  pending: "Records still queued on the device at its last status: not delivered yet, not lost.",
  lost: "Captured records that are neither stored, evicted nor pending: unexplained gaps. 0 on a healthy fleet.",
};

function ledgerNote(ledger) {
  const at = ledger.status_ts
    ? `the agent's last status, ${esc(fmtTime(ledger.status_ts))} (${esc(fmtAgo(ledger.status_ts))})`
    : "the agent's first status (none yet)";
  return `Captured and Pending are as of ${at}; Received counts what is stored now, so it can run ahead of Captured between two statuses. Hover a column for its meaning.`;
}

function schemaText(channels) {
  if (channels === null || channels === undefined) return "";
  return ` · ${fmtNum(channels)} ${channels === 1 ? "channel" : "channels"}`;
}

function ledgerRows(ledger, schemas) {
  return ledger.streams.map((s) => `<tr><td class="mono">${esc(s.stream)}</td><td>${esc(s.kind)}${esc(schemaText((schemas || {})[s.stream]))}</td>
    <td class="num">${fmtNum(s.captured)}</td><td class="num">${fmtNum(s.received)}</td><td class="num">${fmtNum(s.duplicates)}</td>
    <td class="num">${fmtNum(s.evicted_count)}</td><td class="num">${fmtNum(s.pending_count)}</td>
    <td class="num ${s.lost_count ? "lost" : ""}">${fmtNum(s.lost_count)}</td></tr>`).join("");
}

// New records of a telemetry stream, at most one request in flight per stream.
async function fetchTelemetry(v, enc, stream) {
  if (v.fetching) {
    v.again = true;
    return;
  }
  v.fetching = true;
  try {
    do {
      v.again = false;
      // From the newest record shown (or the last 30 s), page by page up to now.
      const from = v.rows.length ? v.rows[v.rows.length - 1].ts + 1 : Date.now() * 1000 - 30e6;
      let cursor = null;
      for (let pages = 0; pages < 20; pages++) {
        const more = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
        const page = await api(`/api/v1/devices/${enc}/streams/${encodeURIComponent(stream)}/telemetry?from=${from}&limit=1000${more}`);
        const seen = new Set(v.rows.map((r) => r.seq));
        const fresh = page.items.filter((r) => !seen.has(r.seq));
        if (fresh.length) {
          v.rows = v.rows.concat(fresh).sort((a, b) => a.ts - b.ts || a.seq - b.seq).slice(-MAX_POINTS);
          v.fresh = true;
        }
        cursor = page.next_cursor;
        if (!cursor) break;
      }
      if (v.panel.isConnected) scheduleRender(v);
      // Batches keep coming: read again at most twice a second.
      if (v.again) await new Promise((r) => setTimeout(r, 500));
    } while (v.again && v.panel.isConnected);
  } catch (e) {
    // The next event tries again.
  } finally {
    v.fetching = false;
  }
}

// Events can arrive many times a second per stream: draw a view at most every 250 ms.
function scheduleRender(v) {
  if (v.renderPending) return;
  v.renderPending = true;
  setTimeout(() => {
    v.renderPending = false;
    if (v.panel.isConnected) render(v);
  }, 250);
}

// Three times the typical spacing of consecutive points: a longer silence is a gap, and the
// chart breaks its line there rather than drawing straight across it.
function gapOf(rows) {
  const d = [];
  for (let i = 1; i < rows.length; i++) d.push(rows[i].ts - rows[i - 1].ts);
  if (!d.length) return 0;
  d.sort((a, b) => a - b);
  return Math.max(3 * d[Math.floor(d.length / 2)], 1000);
}

function hasGaps(rows, gap) {
  for (let i = 1; i < rows.length; i++) if (rows[i].ts - rows[i - 1].ts > gap) return true;
  return false;
}

function render(v) {
  const rows = v.rows;
  const body = v.panel.querySelector("tbody");
  const recent = rows.slice(-(v.kind === "inference" ? MAX_ROWS : 5)).reverse();
  if (v.kind === "inference") {
    body.innerHTML = recent.map((r, i) => `<tr${i === 0 && v.fresh ? ' class="flash"' : ""}><td>${fmtTime(r.ts)}</td><td class="num">${r.seq}</td>
      <td>${esc(r.model)} <span class="muted">${esc(r.version)}</span></td><td>${outputText(r)}</td><td class="num">${fmtNum(r.latency_us)} µs</td></tr>`).join("");
    const scored = rows.filter((r) => r.output_kind === "anomaly");
    if (scored.length) {
      const thr = scored[scored.length - 1].threshold;
      const gap = gapOf(scored);
      drawChart(v.canvas, [{
        points: scored.map((r) => [r.ts, r.score]), color: COLORS[0],
        marks: scored.filter((r) => r.anomalous).map((r) => [r.ts, r.score]),
      }], { hline: thr, ymin: 0, gapUs: gap });
      v.legend.innerHTML = '<span class="sw sw-0"></span>anomaly score<span class="sw sw-thr"></span>threshold<span class="sw sw-bad"></span>anomalous'
        + (hasGaps(scored, gap) ? '<br>The line breaks where no result was stored for a while (device offline, or results not sent).' : "");
    } else {
      // One row per label, named on the axis: the y position is a category, not a number.
      const labels = [...new Set(rows.map((r) => r.label))].sort();
      drawChart(v.canvas, labels.map((l, i) => ({
        points: rows.filter((r) => r.label === l).map((r) => [r.ts, labels.length - i]), color: COLORS[i % COLORS.length], dots: true,
      })), { ymin: 0.5, ymax: labels.length + 0.5, yTicks: labels.map((l, i) => [labels.length - i, l]) });
      v.legend.innerHTML = labels.map((l, i) => `<span class="sw sw-${i % COLORS.length}"></span>${esc(l)}`).join("");
    }
  } else {
    body.innerHTML = recent.map((r, i) => `<tr${i === 0 && v.fresh ? ' class="flash"' : ""}><td>${fmtTime(r.ts)}</td><td class="num">${r.seq}</td>
      <td class="mono">${(r.values || []).map((x) => (x === null ? "null" : fmtNum(x, 3))).join(", ")}</td></tr>`).join("");
    const channels = Math.min(6, Math.max(0, ...rows.map((r) => (r.values || []).length)));
    const series = [];
    for (let c = 0; c < channels; c++) {
      series.push({ points: rows.filter((r) => r.values && r.values[c] !== null && r.values[c] !== undefined).map((r) => [r.ts, r.values[c]]), color: COLORS[c] });
    }
    const gap = gapOf(rows);
    drawChart(v.canvas, series, { gapUs: gap });
    v.legend.innerHTML = series.map((_, c) => `<span class="sw sw-${c}"></span>channel ${c}`).join("")
      + (hasGaps(rows, gap)
        ? `<br><span class="gap-note">Lines break where no sample was stored for more than ${fmtNum(gap / 1000)} ms: a device with
           <code>inference.forward_raw = "anomalies"</code> sends raw samples only around anomalous windows, so its telemetry
           has time gaps between them (sequence numbers stay contiguous; the ledger shows none missing).</span>`
        : "");
  }
}

// ---- routing -----------------------------------------------------------------------------

async function route() {
  state.view = null;
  if (!state.token) {
    stopLive();
    showLogin();
    return;
  }
  document.getElementById("signout").hidden = false;
  startLive();
  const hash = location.hash || "#/";
  const path = hash.slice(1).split("?")[0];
  let nav = "overview";
  try {
    if (path.startsWith("/rollout")) {
      nav = "rollouts";
      markNav(nav);
      if (path.startsWith("/rollout/")) await showRollout(decodeURIComponent(path.slice("/rollout/".length)));
      else await showRollouts();
    } else if (path.startsWith("/device/")) {
      nav = "devices";
      markNav(nav);
      await showDevice(decodeURIComponent(path.slice("/device/".length)));
    } else if (path.startsWith("/captures")) {
      nav = "captures";
      markNav(nav);
      await showCaptures(); // captures.js
    } else if (path.startsWith("/monitoring")) {
      nav = "monitoring";
      markNav(nav);
      await showMonitoring(); // monitoring.js
    } else if (path.startsWith("/models")) {
      nav = "models";
      markNav(nav);
      await showModels(); // models.js
    } else if (path.startsWith("/devices")) {
      nav = "devices";
      markNav(nav);
      await showDevices();
    } else {
      markNav(nav);
      await showOverview();
    }
  } catch (e) {
    showError(e);
  }
}

function markNav(nav) {
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.nav === nav);
}

window.addEventListener("DOMContentLoaded", () => {
  takeTokenFromFragment();
  state.token = sessionStorage.getItem(TOKEN_KEY);
  document.getElementById("signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  route();
});

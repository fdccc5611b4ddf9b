// Ember fleet dashboard: the Monitoring page (#/monitoring), model drift.
//
// Loaded after app.js (classic scripts share their top-level names): uses its `api`, `esc`,
// `fmtTime`, `fmtNum` and `main`; app.js's router calls `showMonitoring()`. One row per model
// version with results in the monitoring window: results, class mix, PSI of each compared
// distribution against the bundle's training baseline, and the drift verdict; below it, the
// devices running that version with their own PSI and verdict.
"use strict";

function fmtPsi(v, limit) {
  if (v === undefined || v === null) return '<span class="muted">–</span>';
  const cls = v > limit ? "anomaly" : "normal";
  return `<span class="badge ${cls}" title="PSI against the training baseline">${Number(v).toFixed(3)}</span>`;
}

function verdict(s) {
  const title = esc((s.drift.reasons || []).join("; "));
  if (s.drift.alert) return `<span class="badge anomaly drift-alert" title="${title}">drift</span>`;
  if ((s.drift.reasons || []).length) return `<span class="badge offline" title="${title}">no verdict</span>`;
  return '<span class="badge online">stable</span>';
}

function classMix(s) {
  if (!s.class_distribution) {
    return s.anomaly_rate === undefined ? "" : `anomaly rate ${(100 * s.anomaly_rate).toFixed(1)}%` +
      (s.baseline_anomaly_rate === undefined ? "" : ` (trained: ${(100 * s.baseline_anomaly_rate).toFixed(1)}%)`);
  }
  return Object.entries(s.class_distribution)
    .map(([k, v]) => `${esc(k)} ${(100 * v).toFixed(0)}%`)
    .join(", ");
}

function summaryCells(s, r) {
  const d = s.drift;
  return `<td class="num">${fmtNum(s.results)}</td>
    <td>${classMix(s)}</td>
    <td>${fmtPsi(d.class_psi, r.psi_threshold)}</td>
    <td>${fmtPsi(d.confidence_psi, r.psi_threshold)}</td>
    <td>${fmtPsi(d.score_psi, r.psi_threshold)}</td>
    <td>${fmtPsi(d.input_psi, r.input_psi_threshold)}</td>
    <td class="num">${fmtNum(Math.round(s.latency_us_p95))}</td>
    <td>${verdict(s)}</td>`;
}

const MONITOR_HEAD = `<th class="num">Results</th><th>Outputs</th><th>Class PSI</th><th>Confidence PSI</th>
  <th>Score PSI</th><th>Input PSI</th><th class="num">p95 µs</th><th>Verdict</th>`;

async function showMonitoring() {
  let r;
  try {
    r = await api("/api/v1/monitoring");
  } catch (e) {
    main().innerHTML = `<h1>Monitoring</h1><section class="panel"><p class="empty">${esc(e.message)}</p></section>`;
    return;
  }
  const versions = r.versions || [];
  const drifting = versions.filter((v) => v.drift.alert).length;
  main().innerHTML = `
    <h1>Monitoring</h1>
    <section class="panel">
      <h2 id="monitor-summary">${fmtNum(versions.length)} model versions, ${fmtNum(drifting)} drifting</h2>
      <p class="muted">Results received in the last ${fmtNum(r.window_s)} s, compared with the baseline each
        bundle recorded at training time (Population Stability Index; drift above ${r.psi_threshold} for outputs,
        ${r.input_psi_threshold} for inputs, with at least ${fmtNum(r.min_windows)} results). Computed
        ${fmtTime(r.computed_at)}.</p>
      ${versions.length ? `<div class="scroll"><table id="monitor-versions">
        <thead><tr><th>Model</th><th>Version</th><th>Baseline</th>${MONITOR_HEAD}<th class="num">Drifting devices</th></tr></thead>
        <tbody>${versions.map((v) => `<tr data-model="${esc(v.model)}" data-version="${esc(v.version)}">
          <td>${esc(v.model)}</td><td class="mono">${esc(v.version)}</td>
          <td>${v.baseline ? "yes" : '<span class="muted">none</span>'}</td>
          ${summaryCells(v, r)}<td class="num">${fmtNum(v.drifting_devices)}</td></tr>`).join("")}</tbody>
      </table></div>` : '<p class="empty">No model results in the window.</p>'}
    </section>
    ${versions.map((v) => `<section class="panel">
      <h2>${esc(v.model)} <span class="mono">${esc(v.version)}</span>: devices</h2>
      <div class="scroll"><table class="monitor-devices" data-model="${esc(v.model)}" data-version="${esc(v.version)}">
        <thead><tr><th>Device</th>${MONITOR_HEAD}</tr></thead>
        <tbody>${v.devices.map((d) => `<tr data-device="${esc(d.device)}">
          <td><a href="#/device/${encodeURIComponent(d.device)}">${esc(d.device)}</a></td>${summaryCells(d, r)}</tr>`).join("")}</tbody>
      </table></div></section>`).join("")}`;
}

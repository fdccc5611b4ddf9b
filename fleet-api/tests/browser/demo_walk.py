"""Walks every dashboard page of a running `ember-fleet demo` in Debian's Chromium.

Started by fleet-api/tests/it/demo.rs with one JSON argument:
  {"url": "<the demo's dashboard URL with #token=...>", "agents": N, "rollout": "r-...",
   "screenshots": "DIR"}
The demo runs on its own (no READY/GO steps). The walk fails on any console error, page error,
failed request or HTTP error, and waits on the rollout's detail page until it completes.
Protocol: see common.py.
"""

import os
import time

from common import browser_page, check, config, run

# The rollout's waves soak ten seconds each and its devices shadow-evaluate first.
ROLLOUT_MS = 150_000


def shot(page, cfg, name):
    os.makedirs(cfg["screenshots"], exist_ok=True)
    page.wait_for_timeout(1600)  # let live-row highlights fade
    page.screenshot(path=os.path.join(cfg["screenshots"], name), full_page=True)


def main(problems):
    cfg = config()
    agents = cfg["agents"]
    timings = {}
    t0 = time.monotonic()
    with browser_page(problems) as (page, _):
        # Overview: every agent online, incidents explained by what the anomaly model calls
        # normal, anomaly rates per device, both models in use.
        page.goto(cfg["url"])
        page.wait_for_selector("#live.on")
        page.wait_for_function(
            "(n) => document.getElementById('ov-online')?.textContent === String(n)", arg=agents
        )
        note = page.text_content("#anomaly-note")
        check("Standing" in note and "Walking" in note, f"the anomaly note names no normal activity: {note!r}")
        page.wait_for_function(
            "(n) => document.querySelectorAll('#rates tbody tr').length === n", arg=agents
        )
        page.wait_for_selector("#incidents tbody tr")
        check(page.query_selector("#anomalies") is None, "the flat anomaly table is back")
        models = page.text_content(".three")
        check("activity" in models and "anomaly" in models, "the models in use are not listed")
        shot(page, cfg, "overview.png")

        # Devices, then one device: ledger (with its snapshot note), results, telemetry.
        page.click('#nav a[data-nav="devices"]')
        page.wait_for_function(
            "(n) => document.querySelectorAll('#devices tbody tr').length === n", arg=agents
        )
        page.click('#devices a[href="#/device/demo-01"]')
        page.wait_for_selector("#ledger tbody tr")
        page.wait_for_selector("#ledger-note")
        page.wait_for_selector("[data-inference] tbody tr")
        page.wait_for_selector("[data-telemetry] tbody tr")
        # Live results and class rows read the same as loaded ones: "Label (NN.N%)".
        page.wait_for_function(
            "() => [...document.querySelectorAll('[data-inference] tbody tr')]"
            ".some((r) => /\\(\\d+(\\.\\d)?%\\)/.test(r.textContent))"
        )
        # The telemetry table shows consecutive records: no sequence number skipped.
        seqs = page.eval_on_selector_all(
            "[data-telemetry] tbody tr", "(rs) => rs.map((r) => Number(r.cells[1].textContent.replace(/,/g, '')))"
        )
        check(
            all(a - b == 1 for a, b in zip(seqs, seqs[1:])),
            f"the latest records skip sequence numbers: {seqs}",
        )
        shot(page, cfg, "device.png")

        # Models: the demo registered its three bundles.
        page.click('#nav a[data-nav="models"]')
        page.wait_for_function("() => document.querySelectorAll('#models tbody tr').length >= 3")
        listed = page.text_content("#models tbody")
        check("1.1.0" in listed, f"activity 1.1.0 is not registered: {listed!r}")
        shot(page, cfg, "models.png")

        # Monitoring: both models' versions in use, compared with their bundles' baselines.
        page.click('#nav a[data-nav="monitoring"]')
        page.wait_for_function(
            "() => [...document.querySelectorAll('#monitor-versions tbody tr')]"
            ".filter((r) => r.textContent.includes('yes')).length >= 2"
        )
        monitored = page.text_content("#monitor-versions tbody")
        check(
            "activity" in monitored and "anomaly" in monitored,
            f"the monitoring page does not list both models: {monitored!r}",
        )

        # Captures: the agents' capture policies (low confidence, samples, anomalies) filled it.
        page.click('#nav a[data-nav="captures"]')
        page.wait_for_selector("#captures tbody tr svg polyline")

        # Rollouts: the demo's rollout, then its detail until it completes.
        page.click('#nav a[data-nav="rollouts"]')
        row = f'#rollout-list tr[data-rollout="{cfg["rollout"]}"]'
        page.wait_for_selector(row)
        shot(page, cfg, "rollouts.png")
        page.click(f"{row} a")
        page.wait_for_selector("#rollout-detail tr[data-wave]")
        waves = page.eval_on_selector_all("#rollout-detail tr[data-wave]", "(r) => r.length")
        check(waves == 3, f"expected 3 waves (canary, 50%, 100%), saw {waves}")
        t1 = time.monotonic()
        page.wait_for_selector('h1 [data-rollout-state="completed"]', timeout=ROLLOUT_MS)
        timings["rollout_wait_ms"] = int((time.monotonic() - t1) * 1000)
        active = page.eval_on_selector_all(
            "#rollout-detail tr[data-device]", "(rs) => rs.filter((r) => r.textContent.includes('active')).length"
        )
        check(active == agents, f"{active} of {agents} devices are active")
        shot(page, cfg, "rollout.png")

        # Back on the overview, every device serves the new version.
        page.click('#nav a[data-nav="overview"]')
        page.wait_for_function(
            "(n) => [...document.querySelectorAll('.three table tr')].some("
            "(r) => r.textContent.includes('1.1.0') && r.textContent.trim().endsWith(String(n)))",
            arg=agents,
        )
        check(not problems, "the dashboard reported problems:\n" + "\n".join(problems))
    timings["total_ms"] = int((time.monotonic() - t0) * 1000)
    return timings


if __name__ == "__main__":
    run(main)

"""Drives Debian's Chromium against a running ember-fleet dashboard.

Started by fleet-api/tests/it/browser.rs with one JSON argument:
  {"base": "http://127.0.0.1:PORT", "token": "...", "device": "...", "screenshots": "DIR",
   "offline": [...], "tag": "k=v", "tagged": [...], "model": "name version", "with_model": [...],
   "anomaly_text": "...", "telemetry_text": "...", "label_text": "...", "bundle": "PATH",
   "bundle_version": "..."}
Protocol: see common.py.
"""

import json
import os
import time
from urllib.parse import quote

from common import browser_page, check, config, ready, run


def main(problems):
    cfg = config()
    timings = {}
    t0 = time.monotonic()
    with browser_page(problems) as (page, ignore_failed_requests):
        timings["launch_ms"] = int((time.monotonic() - t0) * 1000)

        # Sign in with the token in the fragment; it must leave the address bar at once.
        t1 = time.monotonic()
        page.goto(f"{cfg['base']}/dashboard/#token={quote(cfg['token'], safe='')}")
        page.wait_for_selector("#ov-online")
        check(cfg["token"] not in page.url, "the token stayed in the address bar")
        page.wait_for_selector("#live.on")
        timings["overview_ms"] = int((time.monotonic() - t1) * 1000)
        online = page.text_content("#ov-online").strip()
        check(
            online == str(cfg["online_count"]),
            f"overview shows {online} online, expected {cfg['online_count']}",
        )
        lost = page.text_content("#ov-lost")
        check(float(lost.replace(",", "")) > 0, f"overview shows no lost records ({lost})")
        # Wait for an ingest tick so the rate is filled in.
        page.wait_for_function("() => document.getElementById('ov-rate').textContent !== '—'")
        page.evaluate("() => (window.__sameDocument = true)")

        # A new anomaly shows up in the open overview's incidents without a reload.
        ready("overview")
        page.wait_for_function(
            "(t) => document.querySelector('#incidents tbody')?.textContent.includes(t)",
            arg=cfg["anomaly_text"],
        )
        # The records published with it show up in the ingest rate of the next tick.
        page.wait_for_function(
            "() => !['—', '0'].includes(document.getElementById('ov-rate').textContent)"
        )
        os.makedirs(cfg["screenshots"], exist_ok=True)
        page.screenshot(path=os.path.join(cfg["screenshots"], "overview.png"), full_page=True)

        # Device list and its filters.
        def rows_of():
            return sorted(
                page.eval_on_selector_all(
                    "#devices tbody tr", "(rs) => rs.map((r) => r.dataset.device)"
                )
            )

        def wait_rows(expected, what):
            want = json.dumps(sorted(expected), separators=(",", ":"))
            try:
                page.wait_for_function(
                    "(w) => JSON.stringify([...document.querySelectorAll('#devices tbody tr')]"
                    ".map((r) => r.dataset.device).sort()) === w",
                    arg=want,
                    timeout=10_000,
                )
            except Exception as e:
                raise AssertionError(f"filter {what} shows {rows_of()}, expected {want}") from e

        page.click('#nav a[data-nav="devices"]')
        page.wait_for_selector("#devices tbody tr")
        n = len(rows_of())
        check(n == cfg["device_count"], f"device list has {n} rows, expected {cfg['device_count']}")
        page.select_option('#filters select[name="state"]', "offline")
        page.click("#filters button")
        wait_rows(cfg["offline"], "state=offline")
        page.evaluate(
            "(tag) => (location.hash = `#/devices?tag=${encodeURIComponent(tag)}`)", cfg["tag"]
        )
        wait_rows(cfg["tagged"], f"tag={cfg['tag']}")
        page.evaluate(
            "(m) => (location.hash = `#/devices?model=${encodeURIComponent(m)}`)", cfg["model"]
        )
        wait_rows(cfg["with_model"], f"model={cfg['model']}")

        # The device page: charts, results, telemetry, ledger; live records arrive without reload.
        t2 = time.monotonic()
        page.click(f'#devices a[href="#/device/{cfg["device"]}"]')
        page.wait_for_selector("#ledger tbody tr")
        page.wait_for_selector("[data-inference] tbody tr")
        page.wait_for_selector("[data-telemetry] tbody tr")
        timings["device_ms"] = int((time.monotonic() - t2) * 1000)
        ready("device")
        page.wait_for_function(
            "(t) => [...document.querySelectorAll('[data-telemetry] tbody')]"
            ".some((b) => b.textContent.includes(t))",
            arg=cfg["telemetry_text"],
        )
        page.wait_for_function(
            "(t) => [...document.querySelectorAll('[data-inference] tbody')]"
            ".some((b) => b.textContent.includes(t))",
            arg=cfg["label_text"],
        )
        # The ledger table follows: the telemetry stream now has 241 records received.
        page.wait_for_function(
            "() => [...document.querySelectorAll('#ledger tbody tr')].some("
            "(r) => r.cells[0].textContent === 'imu' && r.cells[3].textContent === '241')"
        )
        # Beside its kind, each sample stream shows its schema (channel count).
        page.wait_for_function(
            "() => [...document.querySelectorAll('#ledger tbody tr')].some("
            "(r) => r.cells[0].textContent === 'imu' && / · \\d+ channels?$/.test(r.cells[1].textContent))"
        )
        check(page.evaluate("() => window.__sameDocument === true"), "the page reloaded")
        page.wait_for_timeout(1600)  # let the row highlight fade before the screenshot
        page.screenshot(path=os.path.join(cfg["screenshots"], "device.png"), full_page=True)

        # The Models page: upload a signed bundle, see it listed, deprecate it.
        page.click('#nav a[data-nav="models"]')
        page.wait_for_selector("#upload-form")
        page.set_input_files("#bundle-file", cfg["bundle"])
        page.click('#upload-form button[type="submit"]')
        page.wait_for_function(
            "(v) => { const t = document.querySelector('#models tbody');"
            " return t && t.textContent.includes(v); }",
            arg=cfg["bundle_version"],
        )
        check("Registered" in page.text_content("#models-msg"), "no upload confirmation")
        page.click(f'#models button[data-version="{cfg["bundle_version"]}"]')
        page.wait_for_function(
            "() => document.querySelector('#models tbody')?.textContent.includes('deprecated')"
        )
        page.screenshot(path=os.path.join(cfg["screenshots"], "models.png"), full_page=True)

        # Signing out forgets the token (and aborts the event stream: not a failure).
        ignore_failed_requests()
        page.click("#signout")
        page.wait_for_selector("#login-form")
        check(
            page.evaluate("() => sessionStorage.length") == 0,
            "the token is still stored after signing out",
        )

        check(not problems, "the dashboard reported problems:\n" + "\n".join(problems))
        timings["total_ms"] = int((time.monotonic() - t0) * 1000)
    return timings


if __name__ == "__main__":
    run(main)

"""Drives Debian's Chromium through the dashboard's Rollouts pages.

Started by fleet-api/tests/it/rollout_service.rs with one JSON argument:
  {"base": "http://127.0.0.1:PORT", "token": "...", "rollout": "r-...", "canary": "...",
   "devices": 3, "screenshots": "DIR"}
Protocol: see common.py.
"""

import os
from urllib.parse import quote

from common import browser_page, check, config, ready, run


def main(problems):
    cfg = config()
    with browser_page(problems, track_requests=False) as (page, _):
        page.goto(f"{cfg['base']}/dashboard/#token={quote(cfg['token'], safe='')}")
        page.wait_for_selector("#live.on")
        page.click('#nav a[data-nav="rollouts"]')
        row = f'#rollout-list tr[data-rollout="{cfg["rollout"]}"]'
        page.wait_for_selector(f'{row} [data-rollout-state="running"]')
        page.click(f"{row} a")
        page.wait_for_selector("#rollout-detail tr[data-wave]")
        waves = page.eval_on_selector_all("#rollout-detail tr[data-wave]", "(r) => r.length")
        check(waves == 2, f"expected 2 waves, saw {waves}")
        devices = page.eval_on_selector_all("#rollout-detail tr[data-device]", "(r) => r.length")
        check(devices == cfg["devices"], f"expected {cfg['devices']} devices, saw {devices}")

        # The canary reports active: the page updates live (no reload) and wave 2 starts.
        marker = page.evaluate("() => (window.__noReload = 1)")
        ready("canary_active")
        page.wait_for_function(
            "(d) => { const tr = document.querySelector(`tr[data-device=\"${d}\"]`);"
            " return tr && tr.textContent.includes('active')"
            " && document.querySelector('tr[data-wave=\"1\"]').classList.contains('current'); }",
            arg=cfg["canary"],
        )
        check(page.evaluate("() => window.__noReload") == marker, "the page reloaded")

        # Commands through the buttons.
        page.click('button[data-command="pause"]')
        page.wait_for_selector('h1 [data-rollout-state="paused"]')
        check(page.is_disabled('button[data-command="pause"]'), "pause stays enabled when paused")
        page.click('button[data-command="resume"]')
        page.wait_for_selector('h1 [data-rollout-state="running"]')
        os.makedirs(cfg["screenshots"], exist_ok=True)
        page.screenshot(path=os.path.join(cfg["screenshots"], "rollout.png"), full_page=True)
        page.click('button[data-command="rollback"]')
        page.wait_for_selector('h1 [data-rollout-state="rolled_back"]')
        page.wait_for_function(
            "(d) => document.querySelector(`tr[data-device=\"${d}\"]`)"
            ".textContent.includes('reverted')",
            arg=cfg["canary"],
        )
        check(not problems, "\n".join(problems))
    return {}


if __name__ == "__main__":
    run(main)

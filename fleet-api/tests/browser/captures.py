"""Drives Debian's Chromium through the dashboard's Captures page.

Started by fleet-api/tests/it/captures.rs with one JSON argument:
  {"base": "http://127.0.0.1:PORT", "token": "...", "device": "...", "seq": N, "label": "..."}
Checks that every unlabelled capture is listed with a plot of its window (one line per
channel), labels capture `seq` through the page's select and Save button, and that the page
shows the new label. Protocol: see common.py.
"""

from urllib.parse import quote

from common import browser_page, check, config, run


def main(problems):
    cfg = config()
    with browser_page(problems) as (page, _):
        page.goto(f"{cfg['base']}/dashboard/#token={quote(cfg['token'], safe='')}")
        page.wait_for_selector("#live.on")
        page.click('#nav a[data-nav="captures"]')
        page.wait_for_selector("#captures tbody tr")
        plots = page.eval_on_selector_all(
            "#captures tbody tr", "(rs) => rs.map((r) => r.querySelectorAll('svg polyline').length)"
        )
        check(plots and all(p == 6 for p in plots), f"each window should plot 6 channels: {plots}")
        row = f'#captures tr[data-device="{cfg["device"]}"][data-seq="{cfg["seq"]}"]'
        page.select_option(f"{row} select.label-choice", cfg["label"])
        page.click(f"{row} button.save-label")
        page.wait_for_function(
            "([sel, label]) => document.querySelector(sel + ' .current-label').textContent === label",
            arg=[row, cfg["label"]],
        )
        msg = page.text_content("#captures-msg")
        check("Labelled" in msg, f"no confirmation: {msg!r}")
        check(not problems, "\n".join(problems))
    return {"rows": len(plots)}


if __name__ == "__main__":
    run(main)

"""Shared plumbing of the dashboard's browser tests (dashboard.py, rollouts.py).

The scripts drive Debian's Chromium (/usr/bin/chromium) through the Python `playwright`
package from PyPI, pinned in fleet-api/tests/python/requirements.txt. They never run
`playwright install`: the wheel brings its own driver, and the browser is the system's.

Protocol with the Rust test that starts them (fleet-api/tests/it/browser.rs): one JSON
argument; `READY <step>` lines on stdout ask the Rust side to publish that step's records to
the broker, and it answers `GO` on stdin once they are acknowledged. The last stdout line is
`OK <json>`; any failure exits 1 with the reason on stderr.
"""

import json
import shutil
import sys
import tempfile
from contextlib import contextmanager

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 30_000
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def config():
    return json.loads(sys.argv[1])


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ready(step):
    say(f"READY {step}")
    answer = sys.stdin.readline().strip()
    if answer != "GO":
        raise AssertionError(f"expected GO for {step}, got {answer!r}")


def check(cond, message):
    if not cond:
        raise AssertionError(message)


@contextmanager
def browser_page(problems, *, track_requests=True):
    """A page in a fresh Chromium profile and a function that stops counting failed requests;
    console errors, page errors, failed requests and HTTP errors are appended to `problems`."""
    profile = tempfile.mkdtemp(prefix="ember-fleet-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                viewport={"width": 1400, "height": 900},
                args=ARGS,
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.on(
                    "console",
                    lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error"
                    else None,
                )
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                failed = _request_failed(problems)
                if track_requests:
                    page.on("requestfailed", failed)
                    page.on(
                        "response",
                        lambda r: problems.append(f"HTTP {r.status}: {r.request.method} {r.url}")
                        if r.status >= 400
                        else None,
                    )
                page.set_default_timeout(WAIT_MS)
                yield page, failed.disable
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class _request_failed:
    """A removable `requestfailed` listener (signing out aborts the event stream)."""

    def __init__(self, problems):
        self.problems = problems
        self.enabled = True

    def disable(self):
        self.enabled = False

    def __call__(self, r):
        if self.enabled:
            self.problems.append(f"request failed: {r.method} {r.url} {r.failure}")


def run(main):
    problems = []
    try:
        result = main(problems)
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        import traceback

        sys.stderr.write(f"browser test failed: {e}\n{traceback.format_exc()}")
        if problems:
            sys.stderr.write("problems so far:\n" + "\n".join(problems) + "\n")
        sys.exit(1)
    say(f"OK {json.dumps(result)}")

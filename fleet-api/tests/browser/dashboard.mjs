// Drives Debian's Chromium (through playwright-core) against a running ember-fleet dashboard.
// Started by fleet-api/tests/it/browser.rs with one JSON argument:
//   {"base": "http://127.0.0.1:PORT", "token": "...", "device": "...", "screenshots": "DIR",
//    "offline": [...], "tag": "k=v", "tagged": [...], "model": "name version", "with_model": [...],
//    "anomaly_text": "...", "telemetry_text": "...", "label_text": "..."}
// Protocol on stdout: `READY <step>` lines ask the Rust side to publish the records of that
// step to the broker; it answers `GO` on stdin once they are acknowledged. The last line is
// `OK <json>`; any failure exits 1 with the reason on stderr.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const cfg = JSON.parse(process.argv[2]);
const WAIT = 30_000;
const lines = createInterface({ input: process.stdin });
const stdinQueue = [];
const stdinWaiters = [];
lines.on("line", (l) => (stdinWaiters.length ? stdinWaiters.shift()(l) : stdinQueue.push(l)));
const nextLine = () => new Promise((r) => (stdinQueue.length ? r(stdinQueue.shift()) : stdinWaiters.push(r)));

async function ready(step) {
  process.stdout.write(`READY ${step}\n`);
  const answer = await nextLine();
  if (answer !== "GO") throw new Error(`expected GO for ${step}, got ${answer}`);
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

const problems = [];
const timings = {};
const profile = mkdtempSync(join(tmpdir(), "ember-fleet-chromium-"));
let context;
try {
  const t0 = Date.now();
  context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  timings.launch_ms = Date.now() - t0;
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console ${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  page.setDefaultTimeout(WAIT);

  // Sign in with the token in the fragment; it must leave the address bar at once.
  const t1 = Date.now();
  await page.goto(`${cfg.base}/dashboard/#token=${encodeURIComponent(cfg.token)}`);
  await page.waitForSelector("#ov-online");
  check(!page.url().includes(cfg.token), "the token stayed in the address bar");
  await page.waitForSelector("#live.on");
  timings.overview_ms = Date.now() - t1;
  const online = await page.textContent("#ov-online");
  check(online.trim() === String(cfg.online_count), `overview shows ${online} online, expected ${cfg.online_count}`);
  const lost = await page.textContent("#ov-lost");
  check(Number(lost.replace(/,/g, "")) > 0, `overview shows no lost records (${lost})`);
  // Wait for an ingest tick so the rate is filled in.
  await page.waitForFunction(() => document.getElementById("ov-rate").textContent !== "—");
  await page.evaluate(() => (window.__sameDocument = true));

  // A new anomaly appears on the open overview without a reload.
  await ready("overview");
  await page.waitForFunction((t) => document.querySelector("#anomalies tbody").textContent.includes(t), cfg.anomaly_text);
  // The records published with it show up in the ingest rate of the next tick.
  await page.waitForFunction(() => !["—", "0"].includes(document.getElementById("ov-rate").textContent));
  mkdirSync(cfg.screenshots, { recursive: true });
  await page.screenshot({ path: join(cfg.screenshots, "overview.png"), fullPage: true });

  // Device list and its filters.
  const waitRows = async (expected, what) => {
    const want = JSON.stringify([...expected].sort());
    try {
      await page.waitForFunction(
        (w) => JSON.stringify([...document.querySelectorAll("#devices tbody tr")].map((r) => r.dataset.device).sort()) === w,
        want, { timeout: 10_000 });
    } catch (e) {
      throw new Error(`filter ${what} shows ${JSON.stringify(await rowsOf())}, expected ${want}`);
    }
  };
  const rowsOf = () => page.$$eval("#devices tbody tr", (rs) => rs.map((r) => r.dataset.device).sort());
  await page.click('#nav a[data-nav="devices"]');
  await page.waitForSelector("#devices tbody tr");
  check((await rowsOf()).length === cfg.device_count, `device list has ${(await rowsOf()).length} rows, expected ${cfg.device_count}`);
  await page.selectOption('#filters select[name="state"]', "offline");
  await page.click("#filters button");
  await waitRows(cfg.offline, "state=offline");
  await page.evaluate((tag) => (location.hash = `#/devices?tag=${encodeURIComponent(tag)}`), cfg.tag);
  await waitRows(cfg.tagged, `tag=${cfg.tag}`);
  await page.evaluate((m) => (location.hash = `#/devices?model=${encodeURIComponent(m)}`), cfg.model);
  await waitRows(cfg.with_model, `model=${cfg.model}`);

  // The device page: charts, results, telemetry, ledger; live records arrive without reload.
  const t2 = Date.now();
  await page.click(`#devices a[href="#/device/${cfg.device}"]`);
  await page.waitForSelector("#ledger tbody tr");
  await page.waitForSelector("[data-inference] tbody tr");
  await page.waitForSelector("[data-telemetry] tbody tr");
  timings.device_ms = Date.now() - t2;
  await ready("device");
  await page.waitForFunction((t) => [...document.querySelectorAll("[data-telemetry] tbody")].some((b) => b.textContent.includes(t)), cfg.telemetry_text);
  await page.waitForFunction((t) => [...document.querySelectorAll("[data-inference] tbody")].some((b) => b.textContent.includes(t)), cfg.label_text);
  // The ledger table follows: the telemetry stream now has 241 records received.
  await page.waitForFunction(() => [...document.querySelectorAll("#ledger tbody tr")].some(
    (r) => r.cells[0].textContent === "imu" && r.cells[3].textContent === "241"));
  check(await page.evaluate(() => window.__sameDocument === true), "the page reloaded");
  await page.waitForTimeout(1600); // let the row highlight fade before the screenshot
  await page.screenshot({ path: join(cfg.screenshots, "device.png"), fullPage: true });

  // The Models page: upload a signed bundle, see it listed, deprecate it.
  await page.click('#nav a[data-nav="models"]');
  await page.waitForSelector("#upload-form");
  await page.setInputFiles("#bundle-file", cfg.bundle);
  await page.click('#upload-form button[type="submit"]');
  await page.waitForFunction((v) => {
    const t = document.querySelector("#models tbody");
    return t && t.textContent.includes(v);
  }, cfg.bundle_version);
  check((await page.textContent("#models-msg")).includes("Registered"), "no upload confirmation");
  await page.click(`#models button[data-version="${cfg.bundle_version}"]`);
  await page.waitForFunction(() => document.querySelector("#models tbody")?.textContent.includes("deprecated"));
  await page.screenshot({ path: join(cfg.screenshots, "models.png"), fullPage: true });

  // Signing out forgets the token (and aborts the event stream: not a failure).
  page.removeAllListeners("requestfailed");
  await page.click("#signout");
  await page.waitForSelector("#login-form");
  check((await page.evaluate(() => sessionStorage.length)) === 0, "the token is still stored after signing out");

  check(problems.length === 0, "the dashboard reported problems:\n" + problems.join("\n"));
  timings.total_ms = Date.now() - t0;
  process.stdout.write(`OK ${JSON.stringify(timings)}\n`);
} catch (e) {
  process.stderr.write(`dashboard test failed: ${e.stack || e}\n${problems.length ? "problems so far:\n" + problems.join("\n") + "\n" : ""}`);
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  lines.close();
}

// Drives Debian's Chromium (playwright-core) through the dashboard's Rollouts pages.
// Started by fleet-api/tests/it/rollout_service.rs with one JSON argument:
//   {"base": "http://127.0.0.1:PORT", "token": "...", "rollout": "r-...", "canary": "...",
//    "devices": 3, "screenshots": "DIR"}
// Protocol as dashboard.mjs: `READY <step>` on stdout, `GO` on stdin; last line `OK {}`.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const cfg = JSON.parse(process.argv[2]);
const WAIT = 30_000;
const lines = createInterface({ input: process.stdin });
const queue = [];
const waiters = [];
lines.on("line", (l) => (waiters.length ? waiters.shift()(l) : queue.push(l)));
const nextLine = () => new Promise((r) => (queue.length ? r(queue.shift()) : waiters.push(r)));

async function ready(step) {
  process.stdout.write(`READY ${step}\n`);
  const answer = await nextLine();
  if (answer !== "GO") throw new Error(`expected GO for ${step}, got ${answer}`);
}

const problems = [];
const profile = mkdtempSync(join(tmpdir(), "ember-fleet-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  page.setDefaultTimeout(WAIT);

  await page.goto(`${cfg.base}/dashboard/#token=${encodeURIComponent(cfg.token)}`);
  await page.waitForSelector("#live.on");
  await page.click('#nav a[data-nav="rollouts"]');
  const row = `#rollout-list tr[data-rollout="${cfg.rollout}"]`;
  await page.waitForSelector(`${row} [data-rollout-state="running"]`);
  await page.click(`${row} a`);
  await page.waitForSelector("#rollout-detail tr[data-wave]");
  const waves = await page.$$eval("#rollout-detail tr[data-wave]", (r) => r.length);
  if (waves !== 2) throw new Error(`expected 2 waves, saw ${waves}`);
  const devices = await page.$$eval("#rollout-detail tr[data-device]", (r) => r.length);
  if (devices !== cfg.devices) throw new Error(`expected ${cfg.devices} devices, saw ${devices}`);

  // The canary reports active: the page updates live (no reload) and wave 2 starts.
  const marker = await page.evaluate(() => (window.__noReload = 1));
  await ready("canary_active");
  await page.waitForFunction((d) => {
    const tr = document.querySelector(`tr[data-device="${d}"]`);
    return tr && tr.textContent.includes("active") && document.querySelector('tr[data-wave="1"]').classList.contains("current");
  }, cfg.canary);
  if ((await page.evaluate(() => window.__noReload)) !== marker) throw new Error("the page reloaded");

  // Commands through the buttons.
  await page.click('button[data-command="pause"]');
  await page.waitForSelector('h1 [data-rollout-state="paused"]');
  if (!(await page.isDisabled('button[data-command="pause"]'))) throw new Error("pause stays enabled when paused");
  await page.click('button[data-command="resume"]');
  await page.waitForSelector('h1 [data-rollout-state="running"]');
  mkdirSync(cfg.screenshots, { recursive: true });
  await page.screenshot({ path: join(cfg.screenshots, "rollout.png"), fullPage: true });
  await page.click('button[data-command="rollback"]');
  await page.waitForSelector('h1 [data-rollout-state="rolled_back"]');
  await page.waitForFunction((d) => document.querySelector(`tr[data-device="${d}"]`).textContent.includes("reverted"), cfg.canary);

  if (problems.length) throw new Error(problems.join("\n"));
  process.stdout.write(`OK {}\n`);
} catch (e) {
  process.stderr.write(`${e.stack || e}\n${problems.join("\n")}\n`);
  process.exitCode = 1;
} finally {
  if (context) await context.close();
  rmSync(profile, { recursive: true, force: true });
  lines.close();
}

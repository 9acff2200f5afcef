// End-to-end browser tests: the example host page, the edge and a real Marimo notebook with its
// own Sail server, in Debian's headless Chromium. scripts/browser-test.sh starts `marina serve`
// and runs this; to run it against a server you started yourself:
//   ADMIN_KEY=$(cat .marina/admin-api-key) node tests/browser/run.mjs
// Environment:
//   HOST_URL       control plane serving the host page   (default http://127.0.0.1:8080)
//   EDGE_URL       the edge                               (default http://127.0.0.1:8000)
//   ADMIN_KEY      an admin API key                       (required)
//   ARTIFACTS_DIR  where the screenshots go               (default ./artifacts)
//   CHROMIUM       the browser                            (default /usr/bin/chromium)
//   MARINA_PROXY__COOKIE__SAME_SITE, MARINA_CONTROL__IDLE_AFTER_SECONDS  the server's settings,
//                  if set, to know what to expect (default strict, 300)
// Prints one line per test and finally `N passed, N failed`; exits non-zero on any failure.

import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { chromium } from "playwright-core";

const env = process.env;
const HOST_URL = (env.HOST_URL || "http://127.0.0.1:8080").replace(/\/$/, "");
const EDGE_URL = (env.EDGE_URL || "http://127.0.0.1:8000").replace(/\/$/, "");
const ADMIN_KEY = env.ADMIN_KEY;
const ARTIFACTS_DIR = path.resolve(env.ARTIFACTS_DIR || "artifacts");
const SAME_SITE = (env.MARINA_PROXY__COOKIE__SAME_SITE || "strict").toLowerCase();
const IDLE_AFTER = Number(env.MARINA_CONTROL__IDLE_AFTER_SECONDS || 300);
const START_TIMEOUT = 180_000; // a notebook start on a busy 2-core machine
const OUTPUT_TIMEOUT = 120_000; // first Spark query: imports pyspark and connects to Sail
if (!ADMIN_KEY) {
  console.error("ADMIN_KEY is required");
  process.exit(2);
}
fs.mkdirSync(ARTIFACTS_DIR, { recursive: true });

// ---- small helpers ----

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nonce = () => Math.random().toString(36).slice(2, 8);
function check(cond, message) {
  if (!cond) throw new Error(message);
}

async function api(key, method, path, body) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(HOST_URL + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}
const notebookStatus = async (key, id) =>
  (await api(key, "GET", `/workloads/notebooks/${id}`)).included.notebooks[0].status;
async function waitStatus(key, id, want, ms) {
  let status;
  for (const end = Date.now() + ms; Date.now() < end; await sleep(500)) {
    if ((status = await notebookStatus(key, id)) === want) break;
  }
  return status;
}

let shotNo = 0;
async function shot(page, name) {
  const file = path.join(ARTIFACTS_DIR, `${String(++shotNo).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file }).catch((e) => console.log(`   (no screenshot ${name}: ${e.message})`));
  console.log(`   screenshot ${file}`);
}

const results = { passed: 0, failed: 0 };
async function test(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.passed++;
    console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.failed++;
    console.log(`FAIL ${name}\n     ${String(e.stack || e).split("\n").slice(0, 4).join("\n     ")}`);
  }
}

// Signs in on the host page with an API key.
async function signIn(page, key) {
  await page.goto(HOST_URL + "/");
  await page.fill("#api-key", key);
  await page.click("#sign-in-button");
  await page.locator("#app").waitFor({ state: "visible" });
}

// Replaces the code of the notebook's first cell and runs it (Ctrl-Enter), as a person would.
async function runInFirstCell(page, frame, code) {
  await frame.locator(".cm-content").first().click();
  await page.keyboard.press("Control+A");
  await page.keyboard.insertText(code);
  await page.keyboard.press("Control+Enter");
}

// A query Sail answers with text that is not in the code itself (upper-cased).
const sailQuery = (tag) =>
  `from pyspark.sql import SparkSession as _S\n` +
  `_spark = _S.builder.getOrCreate()\n` +
  `_spark.sql("select upper('sail ${tag}') as engine, 6 * 7 as answer").toPandas()`;
const sailAnswer = (tag) => `SAIL ${tag.toUpperCase()}`;

// ---- the tests ----

const state = {}; // what one test leaves for the next
const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const newPage = async () => (await browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
const need = (...keys) => keys.forEach((k) => check(state[k], `needs ${k} from an earlier test, which failed`));

await test("setup: an owner and a team member with their own API keys (IAM API)", async () => {
  const tag = nonce();
  const team = await api(ADMIN_KEY, "POST", "/iam/teams", { name: `analysts-${tag}` });
  const member = async (name) => {
    const m = await api(ADMIN_KEY, "POST", "/iam/members", { name, email: `${name}@example.com`, role: "member" });
    await api(ADMIN_KEY, "POST", `/iam/teams/${team.id}/members`, { memberIds: [m.id] });
    const k = await api(ADMIN_KEY, "POST", `/iam/members/${m.id}/api-keys`, { name: "browser-test" });
    return { id: m.id, key: k.secret };
  };
  Object.assign(state, { team, owner: await member(`owner-${tag}`), viewer: await member(`viewer-${tag}`) });
  check(state.owner.key && state.viewer.key, "API key creation returned no secret");
});

await test("admin signs in on the host page and has a workload config", async () => {
  const page = await newPage();
  await signIn(page, ADMIN_KEY);
  await page.locator("#config option").first().waitFor({ state: "attached", timeout: 5000 }).catch(async () => {
    await page.click("#create-config"); // none yet: create one from the page
    await page.locator("#config option").first().waitFor({ state: "attached" });
  });
  state.configId = await page.locator("#config").inputValue();
  check(state.configId, "no workload config selectable");
  await shot(page, "admin-host-page");
  await page.context().close();
});

await test("owner creates, shares and starts a notebook on the host page (live status)", async () => {
  need("owner", "configId", "team");
  const page = await newPage();
  state.ownerPage = page;
  await page.clock.install(); // real time flows; the ping test below jumps ahead
  await signIn(page, state.owner.key);
  const name = `browser-test-${nonce()}`;
  await page.selectOption("#config", state.configId);
  await page.fill("#notebook-name", name);
  await page.click("#create-notebook");
  const row = page.locator("[data-testid=notebook-row]", { hasText: name });
  await row.waitFor();
  state.notebookId = await row.getAttribute("data-notebook-id");
  await row.locator("[data-testid=team-select]").selectOption(state.team.id);
  await row.locator("[data-action=share]").click();
  // The list is re-rendered after sharing: find the row again.
  const shared = page.locator(`[data-notebook-id="${state.notebookId}"]`);
  await shared.locator("[data-testid=teams]", { hasText: state.team.name }).waitFor();
  // Record every status the page shows, to see it change live (without a reload).
  await page.evaluate(() => {
    window.seenStatuses = [];
    new MutationObserver(() => {
      for (const c of document.querySelectorAll("[data-testid=status]")) {
        if (window.seenStatuses.at(-1) !== c.textContent) window.seenStatuses.push(c.textContent);
      }
    }).observe(document.getElementById("notebooks"), { subtree: true, childList: true, characterData: true });
  });
  await shared.locator("[data-action=start]").click();
  const status = shared.locator("[data-testid=status]");
  // Started, it is running, or already detached when no browser has it open yet.
  const started = /^(running|idle|detached)$/;
  await status.filter({ hasText: /^(running|idle|detached|failed)$/ }).waitFor({ timeout: START_TIMEOUT });
  await shot(page, "owner-notebook-started");
  check(started.test(await status.textContent()), `start failed: ${await status.getAttribute("title")}`);
  const seen = await page.evaluate(() => window.seenStatuses);
  check(seen.includes("starting") && started.test(seen.at(-1)), `statuses shown: ${seen}`);
});

await test("owner opens the notebook in the iframe, edits a cell to query Sail and sees the output", async () => {
  need("ownerPage", "notebookId");
  const page = state.ownerPage;
  const id = state.notebookId;
  const opened = page.waitForResponse((r) => r.url().endsWith(`/workloads/notebooks/${id}/open`));
  const handshake = page.waitForResponse((r) => r.url().includes("/_auth?"));
  await page.locator(`[data-notebook-id="${id}"] [data-action=open]`).click();
  state.usedUrl = (await (await opened).json()).url;
  const hs = await handshake;
  state.handshake = { status: hs.status(), headers: await hs.headersArray() };
  const frame = page.frameLocator("#notebook-frame");
  await frame.locator(".cm-content").first().waitFor({ timeout: 60_000 });
  await shot(page, "owner-notebook-loaded");
  state.tag1 = nonce();
  await runInFirstCell(page, frame, sailQuery(state.tag1));
  await frame.getByText(sailAnswer(state.tag1), { exact: true }).first().waitFor({ timeout: OUTPUT_TIMEOUT });
  await frame.getByText("42", { exact: true }).first().waitFor();
  await shot(page, "owner-sail-output");
});

await test("one-time URL: token gone from the iframe, cookie host-only/HttpOnly/SameSite, second use refused", async () => {
  need("usedUrl", "handshake");
  const page = state.ownerPage;
  const id = state.notebookId;
  check(new URL(state.usedUrl).origin === new URL(EDGE_URL).origin, `open URL ${state.usedUrl} is not on ${EDGE_URL}`);
  // After the redirect the iframe shows the notebook, with no token in its address.
  const frame = await (await page.$("#notebook-frame")).contentFrame();
  check(!/token/i.test(frame.url()) && frame.url().startsWith(EDGE_URL), `iframe URL ${frame.url()}`);
  // The handshake: 303 with one cookie, host-only (no Domain), HttpOnly, the configured SameSite.
  const { status, headers } = state.handshake;
  check(status === 303, `handshake answered ${status}`);
  const location = headers.find((h) => h.name.toLowerCase() === "location")?.value || "";
  check(location && !/token/i.test(location), `Location: ${location}`);
  const cookies = headers.filter((h) => h.name.toLowerCase() === "set-cookie").flatMap((h) => h.value.split("\n"));
  check(cookies.length === 1, `Set-Cookie headers: ${JSON.stringify(cookies)}`);
  const attrs = cookies[0].split(";").slice(1).map((a) => a.trim().toLowerCase());
  check(attrs.includes("httponly"), `not HttpOnly: ${cookies[0]}`);
  check(attrs.includes(`samesite=${SAME_SITE}`), `not SameSite=${SAME_SITE}: ${cookies[0]}`);
  check(!attrs.some((a) => a.startsWith("domain=")), `not host-only: ${cookies[0]}`);
  // The browser stored it so, and scripts in the notebook cannot read it.
  const cookieName = cookies[0].split("=")[0];
  const stored = (await page.context().cookies(`${EDGE_URL}/notebooks/${id}/`)).find((c) => c.name === cookieName);
  check(stored && stored.httpOnly && stored.sameSite.toLowerCase() === SAME_SITE, `stored cookie ${JSON.stringify(stored)}`);
  check(!stored.domain.startsWith("."), `stored cookie has a domain: ${stored.domain}`);
  check(!(await frame.evaluate(() => document.cookie)).includes(cookieName), "the notebook page can read the cookie");
  // The same URL a second time, in a fresh browser: the "link already used" page.
  const again = await newPage();
  const res = await again.goto(state.usedUrl);
  await shot(again, "one-time-url-reused");
  check(res.status() >= 400, `second use answered ${res.status()}`);
  check(/already (been )?used/i.test(await again.textContent("body")), "no 'link already used' message");
  check((await again.locator(".cm-content").count()) === 0, "the notebook loaded on a reused URL");
  await again.context().close();
});

await test("team member sees the owner's live outputs read-only; edit, run and take over change nothing", async () => {
  need("viewer", "notebookId", "tag1");
  const id = state.notebookId;
  const page = await newPage();
  state.viewerPage = page;
  // Remember the Marimo session headers the viewer's notebook page sends, to replay them below.
  let marimoHeaders = null;
  page.on("request", (r) => {
    const h = r.headers();
    if (r.url().startsWith(EDGE_URL) && h["marimo-session-id"]) marimoHeaders = h;
  });
  await signIn(page, state.viewer.key);
  await page.locator(`[data-notebook-id="${id}"] [data-action=open]`).click();
  const frame = page.frameLocator("#notebook-frame");
  await frame.getByText(sailAnswer(state.tag1), { exact: true }).first().waitFor({ timeout: 60_000 });
  await shot(page, "viewer-sees-owner-output");
  const editable = await frame.locator(".cm-content").first().getAttribute("contenteditable");
  check(editable === "false", `the viewer's cell is editable (${editable})`);

  // Try everything a viewer's UI offers: take over, type into the cell, run it.
  const takeover = frame.getByTestId("takeover-button");
  if (await takeover.count()) await takeover.first().click().catch(() => {});
  await frame.locator(".cm-content").first().click();
  await page.keyboard.press("Control+A");
  await page.keyboard.insertText('raise SystemExit("viewer was here")');
  await page.keyboard.press("Control+Enter");
  await page.keyboard.press("Shift+Enter");
  // And the API calls behind those buttons, sent straight from the viewer's notebook page.
  for (let i = 0; !marimoHeaders && i < 30; i++) await sleep(500);
  check(marimoHeaders, "the viewer's page sent no Marimo API request");
  const cellId = await frame.locator("[data-cell-id]").first().getAttribute("data-cell-id");
  const fHandle = await (await page.$("#notebook-frame")).contentFrame();
  const statuses = await fHandle.evaluate(async ({ headers, cellId }) => {
    const post = async (p, body) =>
      (await fetch(p, { method: "POST", headers: { "Content-Type": "application/json", "Marimo-Session-Id": headers["marimo-session-id"], "Marimo-Server-Token": headers["marimo-server-token"] }, body: JSON.stringify(body) })).status;
    return {
      takeover: await post("api/kernel/takeover", {}),
      run: await post("api/kernel/run", { cellIds: [cellId], codes: ['raise SystemExit("viewer was here")'] }),
    };
  }, { headers: marimoHeaders, cellId });
  check(statuses.takeover >= 400 && statuses.run >= 400, `viewer API calls answered ${JSON.stringify(statuses)}`);
  await fHandle.evaluate(() => getSelection().removeAllRanges()); // Ctrl-A selected the page
  await sleep(2000);
  await shot(page, "viewer-after-attempts");

  // The owner's notebook is untouched: same code and output, still the editor.
  need("ownerPage");
  const owner = state.ownerPage;
  const ownerFrame = owner.frameLocator("#notebook-frame");
  const code = await ownerFrame.locator(".cm-content").first().innerText();
  check(code.includes(state.tag1) && !code.includes("viewer was here"), `owner's cell now reads: ${code}`);
  check((await ownerFrame.getByText(sailAnswer(state.tag1), { exact: true }).count()) > 0, "owner's output is gone");
  check((await ownerFrame.getByTestId("takeover-button").count()) === 0, "the owner was demoted to a reader");
  check((await ownerFrame.locator(".cm-content").first().getAttribute("contenteditable")) === "true", "owner's cell is not editable");
  await shot(owner, "owner-after-viewer-attempts");

  // The owner runs a new query; the viewer's mirror follows live.
  state.tag2 = nonce();
  await runInFirstCell(owner, ownerFrame, sailQuery(state.tag2));
  await ownerFrame.getByText(sailAnswer(state.tag2), { exact: true }).first().waitFor({ timeout: OUTPUT_TIMEOUT });
  await frame.getByText(sailAnswer(state.tag2), { exact: true }).first().waitFor({ timeout: 30_000 });
  await shot(page, "viewer-live-update");
});

await test("the host page shows the API's errors: a team member may not stop the owner's notebook", async () => {
  need("viewerPage", "notebookId");
  const page = state.viewerPage;
  await page.locator(`[data-notebook-id="${state.notebookId}"] [data-action=stop]`).click();
  const error = page.locator("#error");
  await error.waitFor({ state: "visible" });
  await shot(page, "viewer-may-not-stop");
  check(/\(\w+\)$/.test(await error.textContent()), `error shown: ${await error.textContent()}`);
  check((await page.locator("#notebook-frame").count()) === 1, "the viewer's notebook was closed");
  const s = await notebookStatus(state.owner.key, state.notebookId);
  check(["running", "idle"].includes(s), `after the viewer's stop the notebook is ${s}`);
});

await test("an origin not allowed to embed notebooks is refused by frame-ancestors", async () => {
  need("owner", "notebookId");
  const { url } = await api(state.owner.key, "POST", `/workloads/notebooks/${state.notebookId}/open`);
  // A page on another origin (localhost instead of 127.0.0.1) that embeds a fresh open URL.
  const server = http.createServer((req, res) => {
    res.setHeader("Content-Type", "text/html");
    res.end(`<!doctype html><title>foreign host</title><h1>Another site</h1><iframe id="f" src="${url}" width="900" height="600"></iframe>`);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const page = await newPage();
  try {
    const refusals = [];
    const edgeResponses = []; // for the failure message: what the edge answered, with or without CSP
    page.on("console", (m) => { if (/frame-ancestors/.test(m.text())) refusals.push(m.text()); });
    page.on("response", async (r) => {
      if (!r.url().startsWith(EDGE_URL)) return;
      const csp = await r.headerValue("content-security-policy");
      edgeResponses.push(`${r.status()} ${new URL(r.url()).pathname} CSP: ${csp || "none"}`);
    });
    await page.goto(`http://localhost:${server.address().port}/`);
    for (let i = 0; !refusals.length && i < 20; i++) await sleep(500);
    await shot(page, "foreign-origin-blocked");
    check(refusals.length > 0, `the browser refused no frame; the edge answered: ${edgeResponses.join("; ")}`);
    const frame = await (await page.$("#f")).contentFrame();
    check(frame.url().startsWith("chrome-error:"), `the frame shows ${frame.url()}`);
  } finally {
    await page.context().close();
    server.close();
  }
});

await test("a shown notebook nobody touches is idle; closing the iframe makes it detached", async () => {
  need("ownerPage", "notebookId");
  if (state.viewerPage) await state.viewerPage.context().close(); // the only other browser on it
  const page = state.ownerPage;
  const { key } = state.owner;
  if (IDLE_AFTER <= 30) {
    const s = await waitStatus(key, state.notebookId, "idle", (IDLE_AFTER + 20) * 1000);
    check(s === "idle", `shown but untouched for ${IDLE_AFTER + 20} s, the notebook is ${s}`);
  } else {
    console.log(`   (idle not checked: control.idle_after_seconds is ${IDLE_AFTER})`);
    const s = await notebookStatus(key, state.notebookId);
    check(["running", "idle"].includes(s), `while shown the notebook is ${s}`);
  }
  await page.click("#close-notebook");
  check((await page.locator("#notebook-frame").count()) === 0, "the iframe is still there");
  const s = await waitStatus(key, state.notebookId, "detached", 20_000);
  await page.click("#refresh");
  await shot(page, "owner-closed-detached");
  check(s === "detached", `20 s after closing, the notebook is ${s}`);
});

// After the detached test: a ping counts as a connected browser for a while.
await test("while the notebook is shown the host page pings every 60 s, and not after closing", async () => {
  need("ownerPage", "notebookId");
  const page = state.ownerPage;
  const id = state.notebookId;
  await page.locator(`[data-notebook-id="${id}"] [data-action=open]`).click();
  await page.frameLocator("#notebook-frame").locator(".cm-content").first().waitFor({ timeout: 60_000 });
  const ping = page.waitForResponse((r) => r.url().endsWith(`/workloads/notebooks/${id}/ping`));
  await page.clock.fastForward(61_000);
  check((await ping).status() === 204, "the ping failed");
  check((await notebookStatus(state.owner.key, id)) === "running", "after a ping the notebook is not running");
  await page.click("#close-notebook");
  let pinged = false;
  page.on("request", (r) => { if (r.url().endsWith("/ping")) pinged = true; });
  await page.clock.fastForward(121_000);
  await sleep(1000);
  check(!pinged, "the page pings a closed notebook");
});

await test("owner stops the notebook from the host page (live status to stopped)", async () => {
  need("ownerPage", "notebookId");
  const row = state.ownerPage.locator(`[data-notebook-id="${state.notebookId}"]`);
  await row.locator("[data-action=stop]").click();
  await row.locator("[data-testid=status]", { hasText: /^stopped$/ }).waitFor({ timeout: 60_000 });
  await shot(state.ownerPage, "owner-notebook-stopped");
  check((await notebookStatus(state.owner.key, state.notebookId)) === "stopped", "the API does not say stopped");
});

await browser.close();
console.log(`${results.passed} passed, ${results.failed} failed`);
process.exit(results.failed ? 1 : 0);

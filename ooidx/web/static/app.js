// The ooidx management page: reads the JSON API under /api/ and keeps itself
// up to date by polling; changes carry the operator token (sessionStorage).
import { barChart, lineChart } from "./charts.js";

const TOKEN_KEY = "ooidx.operator-token";
const STATS_EVERY = 3000;      // ms between two statistics samples
const DATASETS_EVERY = 5000;
const EVENTS_EVERY = 5000;
const SUBSCRIPTIONS_EVERY = 10000;
const UNAVAILABLE_EVERY = 30000; // a service that is not on this node is asked again less often
const SAMPLES = 120;           // time series kept on the page (6 minutes at 3 s)

const $ = (id) => document.getElementById(id);

// --------------------------------------------------------------------------
// the API

class ApiError extends Error {
  constructor(message, type, status) {
    super(message);
    this.type = type;
    this.status = status;
  }
}

function token() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError("The exchange cannot be reached (is the daemon running?).", "NetworkError", 0);
  }
  let answer = null;
  try { answer = await response.json(); } catch { /* not JSON: said below */ }
  if (!response.ok) {
    const error = answer && answer.error;
    if (error && error.message) throw new ApiError(error.message, error.type, response.status);
    throw new ApiError(`The exchange answered ${response.status} ${response.statusText || ""} without an explanation.`,
                       "HTTPError", response.status);
  }
  if (answer === null) throw new ApiError("The exchange sent an answer that is not JSON.", "BadReply", response.status);
  return answer;
}

// --------------------------------------------------------------------------
// formatting

const number = new Intl.NumberFormat();

// Binary units, as the CLI prints them (KiB = 1024 B); a fraction of a byte
// (a rate's axis: 0.5 B/s) keeps its digit instead of rounding to 1.
function bytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  const shown = i === 0 && Number.isInteger(n) ? String(n) : n.toFixed(Math.abs(n) < 10 ? 1 : 0);
  return `${shown} ${units[i]}`;
}

function rate(n) {
  if (!Number.isFinite(n)) return "–";
  if (n === 0) return "0";
  if (n < 10) return n.toFixed(n < 1 ? 2 : 1);
  return number.format(Math.round(n));
}

function ago(t) {
  if (typeof t !== "number") return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 5) return "just now";
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(t * 1000).toLocaleDateString();
}

function fullTime(t) {
  return typeof t === "number" ? new Date(t * 1000).toLocaleString([], { hourCycle: "h23" }) : "";
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit",
                                                     hourCycle: "h23" });
}

function make(tag, { text, cls, attrs } = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

// --------------------------------------------------------------------------
// messages

let okTimer = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("ok").hidden = true;
}

function showOk(message) {
  $("error").hidden = true;
  const box = $("ok");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(okTimer);
  okTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

function clearMessages() {
  $("error").hidden = true;
}

function unavailable(id, error) {
  const box = $(id);
  if (!error) { box.hidden = true; return false; }
  let text = error.message;
  if (error.status === 401) text = "Reading needs the operator token on this exchange: enter it at the top.";
  box.textContent = text;
  box.hidden = false;
  return true;
}

function setLive(ok, text) {
  $("live").classList.toggle("down", !ok);
  $("live-text").textContent = text;
}

// --------------------------------------------------------------------------
// the token

function showTokenState() {
  const has = Boolean(token());
  $("token-state").textContent = has
    ? "Token in use for this tab: you can make changes."
    : "No token: you can look, not change.";
  $("token-forget").hidden = !has;
  $("token").value = "";
  $("token").placeholder = has ? "•••••••• (in use)" : "needed to make changes";
}

function needToken() {
  if (token()) return false;
  showError("Enter the operator token first (at the top of the page) to make changes.");
  $("token").focus();
  return true;
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("token").value.trim();
  if (!value) { showError("The operator token field is empty."); $("token").focus(); return; }
  try { sessionStorage.setItem(TOKEN_KEY, value); } catch { /* private mode: kept for this page only */ }
  showTokenState();
  showOk("Token in use for this tab. It is checked on your first change.");
  refreshAll();
});

$("token-forget").addEventListener("click", () => {
  try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* nothing kept */ }
  showTokenState();
  showOk("Token forgotten.");
  $("token").focus();
});

// --------------------------------------------------------------------------
// statistics

const series = { requests: [], bytes: [] };
let lastStats = null;
let lastDatasetStats = {};

function drawCharts() {
  lineChart($("chart-requests"), series.requests, { format: rate, label: "Requests per second" });
  lineChart($("chart-bytes"), series.bytes, { format: (v) => `${bytes(v)}/s`, axis: (v) => `${bytes(v)}/s`,
                                              label: "Bytes per second" });
  const rows = Object.entries(lastDatasetStats)
    .map(([label, s]) => ({ label, hits: s.hits || 0, misses: s.misses || 0 }))
    .filter((r) => r.hits + r.misses > 0)
    .sort((a, b) => (b.hits + b.misses) - (a.hits + a.misses) || a.label.localeCompare(b.label));
  barChart($("chart-hits"), rows, { format: (v) => number.format(v), label: "Cache hits and misses per dataset" });
}

function sample(stats) {
  const t = typeof stats.time === "number" ? stats.time : Date.now() / 1000;
  if (lastStats && t > lastStats.time) {
    const dt = t - lastStats.time;
    const dr = stats.requests - lastStats.requests, db = stats.bytes - lastStats.bytes;
    if (dr >= 0 && db >= 0) {  // counters that went down: a controller restarted; skip the sample
      series.requests.push({ t, v: dr / dt });
      series.bytes.push({ t, v: db / dt });
      for (const s of Object.values(series)) if (s.length > SAMPLES) s.splice(0, s.length - SAMPLES);
    }
  }
  lastStats = { time: t, requests: stats.requests, bytes: stats.bytes };
}

async function loadStats() {
  try {
    const stats = await api("GET", "/api/stats");
    unavailable("stats-unavailable", null);
    sample(stats);
    lastDatasetStats = stats.datasets || {};
    $("t-requests").textContent = number.format(stats.requests);
    $("t-hits").textContent = number.format(stats.hits);
    $("t-misses").textContent = number.format(stats.misses);
    const answered = stats.hits + stats.misses;
    $("t-rate").textContent = answered ? `${Math.round((100 * stats.hits) / answered)} %` : "–";
    $("t-bytes").textContent = bytes(stats.bytes);
    $("t-errors").textContent = number.format(stats.errors);
    $("t-errors").classList.toggle("bad", stats.errors > 0);
    $("stats-since").textContent = `Counting since ${fullTime(stats.since)}`;
    drawCharts();
    setLive(true, `Live · updated ${clock(Date.now() / 1000)}`);
    return STATS_EVERY;
  } catch (e) {
    if (e.type === "NetworkError") setLive(false, e.message);
    else setLive(true, `Live · updated ${clock(Date.now() / 1000)}`);
    unavailable("stats-unavailable", e);
    return e.type === "Unavailable" ? UNAVAILABLE_EVERY : STATS_EVERY;
  }
}

// --------------------------------------------------------------------------
// datasets

const rows = new Map(); // name -> {tr, cells}
let datasets = [];

function cell(tr, cls) {
  const td = make("td", { cls });
  tr.appendChild(td);
  return td;
}

function newRow(name) {
  const tr = make("tr");
  tr.dataset.name = name;
  const th = make("th", { text: name, attrs: { scope: "row" } });
  tr.appendChild(th);
  const cells = {
    url: cell(tr, "url"), status: cell(tr), fetched: cell(tr), versions: cell(tr, "num"), size: cell(tr, "num"),
    hits: cell(tr, "num"), misses: cell(tr, "num"), actions: cell(tr, "actions"),
  };
  const refresh = make("button", { text: "Refresh now", cls: "small", attrs: { type: "button", "data-action": "refresh",
                                                                                "aria-label": `Refresh ${name} now` } });
  const purge = make("button", { text: "Purge…", cls: "small danger-quiet", attrs: { type: "button", "data-action": "purge",
                                                                                      "aria-label": `Purge ${name}` } });
  const versions = make("button", { text: "Versions", cls: "small", attrs: { type: "button", "data-action": "versions",
                                                                              "aria-label": `Versions of ${name}`,
                                                                              "aria-controls": "versions" } });
  refresh.addEventListener("click", () => refreshDataset(name, refresh));
  purge.addEventListener("click", () => purgeDataset(name, purge));
  versions.addEventListener("click", () => showVersions(name, versions));
  cells.actions.append(versions, refresh, purge);
  cells.refresh = refresh;
  cells.purge = purge;
  return { tr, cells };
}

function setText(node, text, title) {
  if (node.textContent !== text) node.textContent = text;
  if (title !== undefined && node.title !== title) node.title = title;
}

function renderDatasets() {
  const showPurged = $("show-purged").checked;
  const visible = datasets.filter((d) => showPurged || d.status !== "purged");
  const body = $("datasets-table").querySelector("tbody");
  const seen = new Set();
  visible.forEach((d) => {
    seen.add(d.name);
    let row = rows.get(d.name);
    if (!row) { row = newRow(d.name); rows.set(d.name, row); }
    const c = row.cells;
    setText(c.url, d.url || "", d.url || "");
    const status = d.status || "unknown";
    const error = d.last_error && d.last_error.reason ? `last error: ${d.last_error.reason}` : "";
    const shown = `${status}|${d.stale ? "stale" : ""}|${error}`;
    if (c.status.dataset.status !== shown) {
      c.status.dataset.status = shown;
      const badges = [make("span", { text: status, cls: `badge ${status}` })];
      if (d.stale) badges.push(make("span", { text: "out of date", cls: "badge stale" }));
      c.status.replaceChildren(...badges);
      c.status.title = error;
    }
    setText(c.fetched, ago(d.last_fetch), fullTime(d.last_fetch));
    setText(c.versions, number.format(d.versions || 0));
    setText(c.size, d.size ? bytes(d.size) : "–", d.size ? `${number.format(d.size)} bytes` : "");
    const live = lastDatasetStats[d.name] || {};
    setText(c.hits, number.format(Math.max(d.hits || 0, live.hits || 0)));
    setText(c.misses, number.format(Math.max(d.misses || 0, live.misses || 0)));
    const purged = status === "purged";
    c.refresh.disabled = purged;
    c.purge.disabled = purged;
    row.tr.classList.toggle("purged", purged);
    body.appendChild(row.tr); // appending an existing row moves it: keeps the sorted order, and focus
  });
  for (const [name, row] of rows) {
    if (!seen.has(name)) { row.tr.remove(); rows.delete(name); }
  }
  $("datasets-empty").hidden = visible.length > 0;
  $("datasets-empty").textContent = datasets.length && !visible.length
    ? "Every dataset is purged: tick “Show purged” to see them."
    : "No datasets yet: register one above.";
}

async function loadDatasets() {
  try {
    const answer = await api("GET", "/api/datasets");
    datasets = answer.datasets || [];
    unavailable("datasets-unavailable", null);
    renderDatasets();
    return DATASETS_EVERY;
  } catch (e) {
    unavailable("datasets-unavailable", e);
    return e.type === "Unavailable" ? UNAVAILABLE_EVERY : DATASETS_EVERY;
  }
}

function fieldFor(type, message) {
  if (type === "InvalidName") return "reg-name";
  if (type === "InvalidURL" || type === "Forbidden") return "reg-url";
  if (/refresh/i.test(message)) return "reg-refresh";
  return null;
}

function markInvalid(id) {
  for (const f of ["reg-name", "reg-url", "reg-refresh"]) {
    if (f === id) $(f).setAttribute("aria-invalid", "true");
    else $(f).removeAttribute("aria-invalid");
  }
}

$("register-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const error = $("register-error");
  error.hidden = true;
  markInvalid(null);
  if (needToken()) return;
  const body = { name: $("reg-name").value.trim(), url: $("reg-url").value.trim() };
  const refresh = $("reg-refresh").value.trim();
  if (refresh) {
    const seconds = Number(refresh);
    body.refresh = Number.isFinite(seconds) ? seconds : refresh; // the server says what is wrong with it
  }
  const button = $("register");
  button.disabled = true;
  try {
    const answer = await api("POST", "/api/datasets", body);
    const d = answer.dataset;
    showOk(`Registered ${d.name} at ${d.url}.`);
    $("register-form").reset();
    await loadDatasets();
  } catch (err) {
    const field = fieldFor(err.type, err.message);
    markInvalid(field);
    error.textContent = err.message;
    error.hidden = false;
    showError(`Could not register ${body.name || "the dataset"}: ${err.message}`);
    if (field) $(field).focus();
  } finally {
    button.disabled = false;
  }
});

async function refreshDataset(name, button) {
  if (needToken()) return;
  button.disabled = true;
  try {
    await api("POST", `/api/datasets/${encodeURIComponent(name)}/refresh`);
    showOk(`Asked for a fresh copy of ${name}: a fetcher is on it.`);
  } catch (e) {
    showError(`Could not refresh ${name}: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

// a dataset's saved versions, newest first, each with what changed from the
// one before it (the manifest's change summary): text nodes only

function versionSize(manifest) {
  const files = manifest && typeof manifest.files === "object" && manifest.files ? Object.values(manifest.files) : [];
  const total = files.reduce((sum, f) => sum + (f && Number.isFinite(f.bytes) ? f.bytes : 0), 0);
  return files.length ? bytes(total) : "–";
}

function versionItem(manifest) {
  const changes = manifest.changes && typeof manifest.changes === "object" ? manifest.changes : {};
  const li = make("li");
  li.dataset.version = String(manifest.version || "");
  li.append(
    make("span", { text: String(manifest.version || "?"), cls: "version" }),
    make("span", { text: fullTime(manifest.saved) || "–", cls: "when" }),
    make("span", { text: versionSize(manifest), cls: "size" }),
    make("span", { text: typeof changes.text === "string" && changes.text ? changes.text : "–", cls: "changes" }),
  );
  return li;
}

let versionsShown = null; // the dataset whose versions are listed

async function showVersions(name, button) {
  const panel = $("versions");
  const note = $("versions-note");
  const list = $("versions-list");
  versionsShown = name;
  $("versions-title").textContent = `Versions of ${name}`;
  note.textContent = "Loading…";
  note.hidden = false;
  list.replaceChildren();
  panel.hidden = false;
  button.disabled = true;
  try {
    const answer = await api("GET", `/api/datasets/${encodeURIComponent(name)}/versions`);
    if (versionsShown !== name) return; // another dataset's versions were asked for meanwhile
    const manifests = Array.isArray(answer.versions) ? answer.versions.filter((m) => m && typeof m === "object") : [];
    list.replaceChildren(...manifests.slice().reverse().map(versionItem));
    note.textContent = manifests.length ? "" : `No saved versions of ${name} yet: a version is saved when it is fetched whole.`;
    note.hidden = manifests.length > 0;
  } catch (e) {
    if (versionsShown !== name) return;
    note.textContent = `Could not read the versions of ${name}: ${e.message}`;
    note.hidden = false;
  } finally {
    button.disabled = false;
  }
}

$("versions-close").addEventListener("click", () => {
  versionsShown = null;
  $("versions").hidden = true;
  $("versions-list").replaceChildren();
});

function confirmPurge(name) {
  const dialog = $("confirm");
  $("confirm-title").textContent = `Purge ${name}?`;
  $("confirm-text").textContent =
    `Requests for ${name} will be refused and its cached responses removed. Registering it again starts afresh.`;
  if (typeof dialog.showModal !== "function") return Promise.resolve(window.confirm(`Purge ${name}?`));
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "purge"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function purgeDataset(name, button) {
  if (needToken()) return;
  if (!(await confirmPurge(name))) { button.focus(); return; }
  button.disabled = true;
  try {
    await api("DELETE", `/api/datasets/${encodeURIComponent(name)}`);
    showOk(`${name} purged.`);
    await loadDatasets();
  } catch (e) {
    showError(`Could not purge ${name}: ${e.message}`);
    button.disabled = false;
  }
}

$("show-purged").addEventListener("change", renderDatasets);

// --------------------------------------------------------------------------
// subscriptions and events

function fillTable(tableId, emptyId, items, columns) {
  const table = $(tableId);
  const body = table.querySelector("tbody");
  body.replaceChildren(...items.map((item) => {
    const tr = make("tr");
    columns.forEach((col, i) => tr.appendChild(make(i ? "td" : "th", { text: col(item), attrs: i ? {} : { scope: "row" } })));
    return tr;
  }));
  table.hidden = items.length === 0;
  $(emptyId).hidden = items.length > 0;
}

function hideTable(tableId, emptyId) {
  $(tableId).hidden = true;
  $(emptyId).hidden = true;
}

async function loadPubSub() {
  try {
    const answer = await api("GET", "/api/pub_sub/subscriptions");
    unavailable("pubsub-unavailable", null);
    fillTable("pubsub-table", "pubsub-empty", answer.subscriptions || [],
              [(s) => s.name, (s) => s.regex, (s) => s.address]);
    return SUBSCRIPTIONS_EVERY;
  } catch (e) {
    unavailable("pubsub-unavailable", e);
    hideTable("pubsub-table", "pubsub-empty");
    return e.type === "Unavailable" ? UNAVAILABLE_EVERY : SUBSCRIPTIONS_EVERY;
  }
}

function delivery(s) {
  if (!s.webhook) return "live stream (SSE)";
  try { return `webhook to ${new URL(s.webhook).host}`; } catch { return "webhook"; }
}

async function loadPeople() {
  if (!token()) {
    unavailable("people-unavailable", new ApiError(
      "Listing people's subscriptions needs the operator token: enter it at the top.", "Unauthorized", 403));
    hideTable("people-table", "people-empty");
    return SUBSCRIPTIONS_EVERY;
  }
  try {
    const answer = await api("GET", "/api/user_subscriptions");
    const missing = answer.unavailable || [];
    unavailable("people-unavailable", missing.length
      ? new ApiError(`Not available on this node: ${missing.join(", ")}.`, "Unavailable", 503) : null);
    fillTable("people-table", "people-empty", answer.subscriptions || [],
              [(s) => s.person || "–", (s) => `${s.kind || "?"} ${s.id || ""}`.trim(), (s) => s.regex || "–", delivery]);
    return SUBSCRIPTIONS_EVERY;
  } catch (e) {
    unavailable("people-unavailable", e.status === 401
      ? new ApiError(`People's subscriptions: ${e.message}.`, e.type, 403) : e);
    hideTable("people-table", "people-empty");
    return e.type === "Unavailable" ? UNAVAILABLE_EVERY : SUBSCRIPTIONS_EVERY;
  }
}

let eventsRegex = "";

function eventDetails(ev) {
  const skip = new Set(["topic", "kind", "dataset", "time", "node"]);
  // a saved version's change summary reads as its one line of words, not as its JSON
  const shown = (k, v) => (k === "changes" && v && typeof v === "object" && typeof v.text === "string" ? v.text
    : typeof v === "object" ? JSON.stringify(v) : v);
  return Object.entries(ev).filter(([k, v]) => !skip.has(k) && v !== null && v !== undefined && v !== "")
    .map(([k, v]) => `${k}: ${shown(k, v)}`).join(" · ");
}

async function loadEvents() {
  try {
    const query = new URLSearchParams({ limit: "50" });
    if (eventsRegex) query.set("regex", eventsRegex);
    const answer = await api("GET", `/api/events?${query}`);
    unavailable("events-unavailable", null);
    const events = (answer.events || []).slice().sort((a, b) => (b.time || 0) - (a.time || 0));
    $("events-list").replaceChildren(...events.map((ev) => {
      const li = make("li");
      const when = make("time", { text: typeof ev.time === "number" ? clock(ev.time) : "", cls: "when" });
      if (typeof ev.time === "number") when.dateTime = new Date(ev.time * 1000).toISOString();
      const kind = make("span", { text: ev.kind || "event", cls: `badge ${ev.kind || ""}` });
      const what = make("span", { text: ev.dataset || ev.topic || "", cls: "what" });
      const details = make("span", { text: [ev.node ? `on ${ev.node}` : "", eventDetails(ev)].filter(Boolean).join(" · "),
                                     cls: "details" });
      li.append(when, kind, what, details);
      return li;
    }));
    $("events-empty").hidden = events.length > 0;
    return EVENTS_EVERY;
  } catch (e) {
    unavailable("events-unavailable", e);
    $("events-list").replaceChildren();
    $("events-empty").hidden = true;
    return e.type === "Unavailable" ? UNAVAILABLE_EVERY : EVENTS_EVERY;
  }
}

$("events-filter").addEventListener("submit", (e) => {
  e.preventDefault();
  eventsRegex = $("events-regex").value.trim();
  loops.events.now();
});

// --------------------------------------------------------------------------
// polling

function every(load) {
  let timer = null;
  let running = false;
  const run = async () => {
    clearTimeout(timer);
    if (running) return;
    running = true;
    let wait;
    try { wait = await load(); } finally { running = false; }
    timer = setTimeout(run, wait);
  };
  return { now: run };
}

const loops = {
  stats: every(loadStats),
  datasets: every(loadDatasets),
  pubsub: every(loadPubSub),
  people: every(loadPeople),
  events: every(loadEvents),
};

function refreshAll() {
  for (const loop of Object.values(loops)) loop.now();
}

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(drawCharts, 150);
});

showTokenState();
drawCharts();
refreshAll();
window.ooidx = { loops, series, bytes }; // for the curious, and the browser test

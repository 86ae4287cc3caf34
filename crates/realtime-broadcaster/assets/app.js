// Switchyard dashboard: plain JavaScript, no build step.
// REST calls go to job-api (window.SWITCHYARD_API); live updates come from
// this server's WebSocket (/v1/ws, protocol in PROTOCOL.md).
"use strict";

const API = (window.SWITCHYARD_API || "").replace(/\/$/, "");
const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out", "dead"]);
const RETRYABLE = new Set(["failed", "cancelled", "timed_out", "dead"]);

const state = {
  token: null,
  org: null,
  jobs: new Map(),      // id -> job view from the API, updated live
  positions: new Map(), // id -> queue position
  openJob: null,        // { id, lastSeq }
  ws: null,
  backoff: 500,
  samples: [],          // { t, tp, qd }
};

// ---------- token ----------
function decodeClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - part.length % 4) % 4)));
  } catch (_) { return null; }
}

function orgsOf(claims) {
  if (!claims) return [];
  const orgs = Object.keys(claims.org_id_to_org_member_info || {});
  if (claims.org_member_info && claims.org_member_info.org_id) orgs.push(claims.org_member_info.org_id);
  return orgs;
}

function takeTokenFromHash() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem("switchyard.token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  return localStorage.getItem("switchyard.token");
}

// ---------- REST ----------
async function api(method, path, body) {
  const res = await fetch(API + path, {
    method,
    headers: Object.assign({ Authorization: "Bearer " + state.token },
      body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error((data && (data.detail || data.title)) || res.statusText);
  return data;
}

const orgPath = (p) => "/v1/orgs/" + encodeURIComponent(state.org) + p;

async function loadJobs() {
  const page = await api("GET", orgPath("/jobs?limit=100"));
  state.jobs = new Map(page.items.map((j) => [j.id, j]));
  await loadPositions();
  renderJobs();
}

async function loadPositions() {
  state.positions = new Map();
  const queues = new Set([...state.jobs.values()].filter((j) => j.status === "queued").map((j) => j.queue));
  for (const q of queues) {
    try {
      const detail = await api("GET", orgPath("/queues/" + encodeURIComponent(q) + "?limit=500"));
      for (const e of detail.entries || []) state.positions.set(e.job_id, e.position);
    } catch (_) { /* positions are a nicety */ }
  }
}

let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => loadJobs().catch(showError), 300);
}

// ---------- rendering ----------
function fmtTime(s) { return s ? new Date(s).toLocaleTimeString() : ""; }

function renderJobs() {
  const rows = [...state.jobs.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  const tbody = $("job-rows");
  tbody.replaceChildren(...rows.map((j) => {
    const tr = document.createElement("tr");
    tr.dataset.id = j.id;
    const cells = [j.id.slice(0, 8), null, j.queue, state.positions.get(j.id) || "", j.command || j.prompt || "", fmtTime(j.created_at)];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      if (i === 1) {
        const s = document.createElement("span");
        s.className = "status " + j.status; s.textContent = j.status; td.append(s);
      } else td.textContent = c;
      tr.append(td);
    });
    tr.addEventListener("click", () => openJob(j.id));
    return tr;
  }));
}

function renderDetail() {
  if (!state.openJob) return;
  const job = state.jobs.get(state.openJob.id);
  const status = job ? job.status : "";
  $("detail-status").textContent = status;
  $("detail-status").className = "status " + status;
  document.querySelector('[data-action="cancel"]').disabled = TERMINAL.has(status);
  document.querySelector('[data-action="retry"]').disabled = !RETRYABLE.has(status);
  document.querySelector('[data-action="approve"]').disabled = status !== "pending_approval";
}

function showError(e) { $("detail-note").textContent = String(e.message || e); }

// ---------- job detail and log ----------
function openJob(id) {
  if (state.openJob && state.openJob.id !== id) send({ type: "unsubscribe", channel: "job:" + state.openJob.id });
  state.openJob = { id, lastSeq: 0 };
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  $("detail-note").textContent = "";
  $("log").replaceChildren();
  renderDetail();
  subscribeJob();
}

function subscribeJob() {
  if (state.openJob) send({ type: "subscribe", channel: "job:" + state.openJob.id, since_seq: state.openJob.lastSeq });
}

function appendLines(lines) {
  const log = $("log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  const frag = document.createDocumentFragment();
  for (const l of lines) {
    if (l.seq <= state.openJob.lastSeq) continue;
    state.openJob.lastSeq = l.seq;
    const span = document.createElement("span");
    span.className = l.stream;
    span.textContent = l.line + "\n";
    frag.append(span);
  }
  log.append(frag);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

async function act(action) {
  if (!state.openJob) return;
  try {
    const job = await api("POST", orgPath("/jobs/" + state.openJob.id + "/" + action));
    if (job && job.id) state.jobs.set(job.id, Object.assign(state.jobs.get(job.id) || {}, job));
    $("detail-note").textContent = action + ": done";
    renderDetail(); renderJobs();
    if (action === "retry") subscribeJob();
  } catch (e) { showError(e); }
}

// ---------- WebSocket ----------
function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/ws";
  const ws = new WebSocket(url, ["switchyard.v1", "bearer." + state.token]);
  state.ws = ws;
  ws.onopen = () => {
    state.backoff = 500;
    $("conn").textContent = "live"; $("conn").className = "pill live";
    send({ type: "subscribe", channel: "org:" + state.org });
    subscribeJob();
    refreshSoon(); // catch up on anything missed while offline
  };
  ws.onmessage = (ev) => onMessage(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    $("conn").textContent = "offline (" + ev.code + ")"; $("conn").className = "pill";
    if (ev.code === 4001) { signOut(); return; }
    setTimeout(connect, state.backoff + Math.random() * 300);
    state.backoff = Math.min(state.backoff * 2, 10000);
  };
}

function onMessage(m) {
  if (m.type === "log" && state.openJob && m.job_id === state.openJob.id) {
    appendLines(m.lines);
  } else if (m.type === "status") {
    const job = state.jobs.get(m.job_id);
    if (job) {
      const reopened = TERMINAL.has(job.status) && !TERMINAL.has(m.status);
      job.status = m.status;
      // A retried job streams again: follow it from the last line seen.
      if (reopened && state.openJob && state.openJob.id === m.job_id) subscribeJob();
      if (m.attempt) job.attempt = m.attempt;
      if (m.started_at) job.started_at = m.started_at;
      if (m.finished_at) job.finished_at = m.finished_at;
      renderJobs(); renderDetail();
      if (m.status === "queued" || (m.channel || "").startsWith("org:")) refreshPositionsSoon();
    } else {
      refreshSoon(); // a job we have not listed yet
    }
  } else if (m.type === "error") {
    showError(new Error(m.code + ": " + m.message));
  }
}

let positionsTimer = null;
function refreshPositionsSoon() {
  clearTimeout(positionsTimer);
  positionsTimer = setTimeout(() => loadPositions().then(renderJobs), 500);
}

// ---------- chart ----------
function loadSamples() {
  try { state.samples = JSON.parse(localStorage.getItem("switchyard.samples." + state.org) || "[]"); } catch (_) { state.samples = []; }
}

async function sample() {
  try {
    const list = await api("GET", orgPath("/queues"));
    const qs = list.queues || [];
    const s = {
      t: Date.now(),
      tp: qs.reduce((a, q) => a + (q.throughput_per_min || 0), 0),
      qd: qs.reduce((a, q) => a + (q.queued || 0), 0),
    };
    const hourAgo = Date.now() - 3600 * 1000;
    state.samples = state.samples.filter((x) => x.t >= hourAgo).concat([s]);
    localStorage.setItem("switchyard.samples." + state.org, JSON.stringify(state.samples));
    drawChart();
  } catch (_) { /* the chart is best effort */ }
}

function drawChart() {
  const svg = $("chart");
  const W = 600, H = 120, now = Date.now(), span = 3600 * 1000;
  const max = Math.max(1, ...state.samples.map((s) => Math.max(s.tp, s.qd)));
  const line = (key) => state.samples
    .map((s) => ((s.t - (now - span)) / span * W).toFixed(1) + "," + (H - 4 - (s[key] / max) * (H - 12)).toFixed(1))
    .join(" ");
  svg.innerHTML = '<polyline class="tp" points="' + line("tp") + '"/><polyline class="qd" points="' + line("qd") + '"/>';
  const last = state.samples[state.samples.length - 1];
  $("chart-now").textContent = last ? " — now " + last.tp.toFixed(1) + " / min, " + last.qd + " queued (max " + max.toFixed(1) + ")" : "";
}

// ---------- start ----------
function signOut() {
  localStorage.removeItem("switchyard.token");
  location.reload();
}

async function start() {
  state.token = takeTokenFromHash();
  if (!state.token) { $("signin").hidden = false; return; }
  const orgs = orgsOf(decodeClaims(state.token));
  if (!orgs.length) { $("signin").hidden = false; $("token").value = ""; return; }
  const select = $("org");
  select.replaceChildren(...orgs.map((o) => { const opt = document.createElement("option"); opt.textContent = o; return opt; }));
  state.org = localStorage.getItem("switchyard.org");
  if (!orgs.includes(state.org)) state.org = orgs[0];
  select.value = state.org;
  select.hidden = orgs.length < 2;
  select.onchange = () => { localStorage.setItem("switchyard.org", select.value); location.reload(); };
  $("signout").hidden = false;
  $("app").hidden = false;
  loadSamples(); drawChart();
  connect();
  loadJobs().catch(showError);
  sample();
  setInterval(sample, 30000);
  setInterval(() => loadJobs().catch(() => {}), 60000); // safety net
}

$("signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("switchyard.token", $("token").value.trim());
  location.reload();
});
$("signout").addEventListener("click", signOut);
$("detail-close").addEventListener("click", () => {
  if (state.openJob) send({ type: "unsubscribe", channel: "job:" + state.openJob.id });
  state.openJob = null; $("detail").hidden = true;
});
document.querySelectorAll("[data-action]").forEach((b) => b.addEventListener("click", () => act(b.dataset.action)));
$("submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = {
    command: $("command").value,
    priority: Number($("priority").value || 0),
    requires_approval: $("approval").checked,
  };
  if ($("queue").value.trim()) body.queue = $("queue").value.trim();
  try {
    const job = await api("POST", orgPath("/jobs"), body);
    state.jobs.set(job.id, job);
    $("submit-result").textContent = "submitted " + job.id;
    renderJobs();
    openJob(job.id);
    refreshPositionsSoon();
  } catch (e) { $("submit-result").textContent = "error: " + e.message; }
});

start();

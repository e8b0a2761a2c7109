// Monitoring view: one card per session (level, open alerts, questions, latest caption), polled from
// /api/sessions every second; a card's "Timeline" button opens that stream's history (captions,
// answers, alerts with their clips, in time order) from /api/history, with a search over it.

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const TIMELINE_POLL_MS = 2000;
const TIMELINE_LIMIT = 300; // newest history entries a timeline shows
const SEARCH_LIMIT = 200;
const STALE_SECONDS = 15; // a caption older than this marks the card
const OPEN_ALERT_MINUTES = 5; // the window of a card's alert count (the gateway's OPEN_ALERT_SECONDS)

const token = $("token");
token.value = sessionStorage.getItem("midasheng-token") || "";
token.addEventListener("change", () => sessionStorage.setItem("midasheng-token", token.value.trim()));
const authHeaders = () => (token.value.trim() ? { Authorization: `Bearer ${token.value.trim()}` } : {});

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds + 1e-6));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
const span = (a, b) => `[${clock(a)}–${clock(b)}]`;
function ago(seconds) {
  if (seconds == null) return "";
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}
function el(tag, cls, text, testid) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  if (testid) e.setAttribute("data-testid", testid);
  return e;
}
async function getJson(url) {
  const resp = await fetch(url, { headers: authHeaders(), cache: "no-store" });
  if (!resp.ok) {
    let why = `${resp.status} ${resp.statusText}`;
    try { why = (await resp.json()).error || why; } catch (_) { /* not JSON */ }
    const err = new Error(resp.status === 401 ? `enter the access token: ${why}` : why);
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

// --- cards ------------------------------------------------------------------------------------
// A card's element (and its Timeline button) lives as long as its session is listed, so the polling
// does not take keyboard focus away; only its body is redrawn.
const cards = new Map(); // sid -> li

function cardOf(sid) {
  let li = cards.get(sid);
  if (li) return li;
  li = el("li", "card", null, "session-card");
  li.dataset.session = sid;
  const head = el("div", "card-head");
  const open = el("button", "small", "Timeline", "card-open");
  open.type = "button";
  open.setAttribute("aria-label", `Open the timeline of session ${sid}`);
  open.setAttribute("aria-controls", "timeline");
  open.addEventListener("click", () => openTimeline(sid));
  head.append(el("h3", null, sid), open);
  li.append(head, el("div", "card-body"));
  cards.set(sid, li);
  return li;
}

function levelLine(dbfs) {
  const p = el("p", "level", null, "card-level");
  const meter = el("meter");
  Object.assign(meter, { min: -60, max: 0, low: -40, high: -6, optimum: -20 });
  meter.value = dbfs == null ? -60 : Math.max(-60, Math.min(0, dbfs));
  meter.setAttribute("aria-label", "audio level");
  const text = dbfs == null ? "level unknown (no recent audio)" : `${dbfs.toFixed(0)} dBFS`;
  p.dataset.dbfs = dbfs == null ? "" : String(dbfs);
  p.append("Level ", meter, ` ${text}`);
  return p;
}

function fillCard(li, s, now) {
  const latest = s.latest;
  const captionAge = latest ? latest.age_seconds + Math.max(0, Date.now() / 1000 - now) : null;
  li.classList.toggle("ended", !s.active);
  li.classList.toggle("stale", s.active && captionAge != null && captionAge > STALE_SECONDS);
  li.classList.toggle("open", timeline.sid === s.id);
  const body = [];
  const meta = [`${clock(s.audio_seconds)} of audio`, `window ${s.window_seconds} s / every ${s.hop_seconds} s`];
  if (s.adapter) meta.push(`adapter ${s.adapter}`);
  if (s.webrtc) meta.push("browser");
  body.push(el("p", "meta", meta.join(" · ")));
  if (s.active) body.push(levelLine(s.level_dbfs));
  const n = s.open_alerts || 0;
  const alerts = el("p", `card-alerts${n ? " hot" : ""}`,
    n ? `${n} alert${n === 1 ? "" : "s"} in the last ${OPEN_ALERT_MINUTES} min`
      : `no alerts in the last ${OPEN_ALERT_MINUTES} min`, "card-alerts");
  alerts.dataset.count = String(n);
  body.push(alerts);
  if (s.questions && s.questions.length) {
    const ul = el("ul", "card-questions", null, "card-questions");
    ul.setAttribute("aria-label", "questions");
    for (const q of s.questions) ul.append(el("li", null, q.text));
    body.push(ul);
  }
  const text = el("p", `caption ${latest && !latest.is_final ? "interim" : "final"}`,
    latest ? latest.text || "(empty caption)" : "waiting for the first caption…", "card-caption");
  // The gateway's "latest" may be an answer to a question: say so rather than pass it off as the caption.
  if (latest && latest.question_id) text.prepend(el("span", "kind", `answer · ${latest.question_id}`));
  body.push(text);
  if (latest) {
    const line = el("p", "meta");
    line.append(el("span", "age", ago(captionAge), "card-age"), document.createTextNode(
      ` · [${clock(latest.window_start)}–${clock(latest.window_end)}] · `
      + (latest.is_final ? "final" : `interim, revision ${latest.revision}`)));
    body.push(line);
  }
  if (!s.active) {
    const end = el("p", "meta", `ended${s.ended ? ` (${s.ended.reason})` : ""} `);
    const a = el("a", null, "captions (WebVTT)");
    a.href = `/api/sessions/${encodeURIComponent(s.id)}/captions.vtt`;
    end.append(a);
    body.push(end);
  }
  li.querySelector(".card-body").replaceChildren(...body);
  return li;
}

// Put `items` into `list` in order, moving only what is out of place.
function sync(list, items) {
  items.forEach((item, i) => {
    if (list.children[i] !== item) list.insertBefore(item, list.children[i] || null);
  });
  while (list.children.length > items.length) list.lastElementChild.remove();
}

async function poll() {
  try {
    const data = await getJson("/api/sessions");
    $("error").textContent = "";
    const listed = new Set([...data.sessions, ...data.recent].map((s) => s.id));
    for (const sid of [...cards.keys()]) if (!listed.has(sid)) cards.delete(sid);
    sync($("cards"), data.sessions.map((s) => fillCard(cardOf(s.id), s, data.now)));
    sync($("recent"), data.recent.map((s) => fillCard(cardOf(s.id), s, data.now)));
    $("count").textContent = String(data.sessions.length);
    $("empty").hidden = data.sessions.length > 0;
    $("updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    $("error").textContent = err.status
      ? `Cannot list sessions: ${err.message}`
      : `The gateway does not answer (${err.message}); retrying every second.`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// --- timeline and search ------------------------------------------------------------------------
const timeline = { sid: "", shown: new Map(), timer: 0, searching: false, clipUrls: [] };
const clipUrl = (id) => `/api/alerts/${encodeURIComponent(id)}/clip.wav`;
const entryKey = (e) => `${e.kind}|${e.event_id}|${e.question_id || ""}`;

// Clips need the "monitor" scope (as this whole view does). Without a token the <audio> element
// loads the URL itself; with one the clip is fetched with the Authorization header (blob: URL).
async function loadClip(audio, alertId) {
  if (!token.value.trim()) { audio.src = clipUrl(alertId); return; }
  try {
    const resp = await fetch(clipUrl(alertId), { headers: authHeaders() });
    if (!resp.ok) throw new Error(`${resp.status} ${resp.statusText}`);
    const url = URL.createObjectURL(await resp.blob());
    timeline.clipUrls.push(url);
    audio.src = url;
  } catch (err) {
    audio.replaceWith(el("span", "hint", `The clip could not be loaded: ${err.message}`));
  }
}

function entryItem(e, hasClip, withStream) {
  const li = el("li", `${e.kind}-entry`, null, "timeline-entry");
  li.dataset.kind = e.kind;
  li.dataset.wall = String(e.wall_time);
  if (e.kind === "alert") li.classList.add("alert");
  const head = el("p", "alert-head");
  const label = e.kind === "alert" ? `alert · ${e.rule_id}` : e.kind === "answer" ? `answer · ${e.question_id}` : "caption";
  head.append(el("span", "kind", label));
  const time = el("time", "stamp", span(e.window_start, e.window_end));
  time.dateTime = new Date(e.wall_time * 1000).toISOString();
  time.title = new Date(e.wall_time * 1000).toLocaleString();
  head.append(time);
  if (withStream) head.append(el("code", "meta", e.stream));
  if (e.kind === "answer" && typeof e.answer === "boolean") {
    head.append(el("span", `badge ${e.answer ? "yes" : "no"}`, e.answer ? "yes" : "no", "answer-badge"));
  }
  li.append(head, el("p", e.kind === "alert" ? "alert-text" : "entry-text", e.text || "(empty)", "entry-text"));
  if (e.kind === "alert") {
    if (hasClip === false) {
      li.append(el("p", "hint", "No audio clip was kept for this alert."));
    } else {
      const audio = el("audio", "clip", null, "alert-clip");
      audio.controls = true;
      audio.preload = "metadata";
      audio.setAttribute("aria-label", `Audio of alert ${e.rule_id} ${span(e.window_start, e.window_end)}`);
      li.append(audio);
      loadClip(audio, e.event_id);
    }
  }
  return li;
}

function clearTimeline() {
  clearTimeout(timeline.timer);
  timeline.shown.clear();
  timeline.clipUrls.forEach((u) => URL.revokeObjectURL(u));
  timeline.clipUrls = [];
  $("timeline-list").replaceChildren();
}

// Adds the entries not shown yet, each at its place in time order (oldest first).
function addEntries(entries, clips, withStream) {
  const list = $("timeline-list");
  const fresh = entries.filter((e) => !timeline.shown.has(entryKey(e)))
    .sort((a, b) => a.wall_time - b.wall_time || a.window_end - b.window_end);
  for (const e of fresh) {
    const li = entryItem(e, clips.get(e.event_id), withStream);
    timeline.shown.set(entryKey(e), li);
    const after = [...list.children].find((c) => Number(c.dataset.wall) > e.wall_time);
    list.insertBefore(li, after || null);
  }
}

async function clipsOf(sid) {
  const clips = new Map();
  try {
    const q = new URLSearchParams({ limit: "500", ...(sid ? { stream: sid } : {}) });
    for (const a of (await getJson(`/api/alerts?${q}`)).alerts) clips.set(a.alert_id, a.has_clip);
  } catch (_) { /* unknown: the clip is tried anyway */ }
  return clips;
}

async function refreshTimeline() {
  clearTimeout(timeline.timer);
  const sid = timeline.sid;
  if (!sid || timeline.searching) return;
  try {
    const q = new URLSearchParams({ stream: sid, limit: String(TIMELINE_LIMIT) });
    const [data, clips] = await Promise.all([getJson(`/api/history?${q}`), clipsOf(sid)]);
    if (timeline.sid !== sid || timeline.searching) return;
    addEntries(data.entries, clips, false);
    const n = timeline.shown.size;
    $("timeline-status").textContent = n
      ? `${n} entr${n === 1 ? "y" : "ies"} (captions, answers, alerts), oldest first; updated ${new Date().toLocaleTimeString()}.`
      : "Nothing in this session's history yet.";
  } catch (err) {
    $("timeline-status").textContent = `Cannot read the history: ${err.message}`;
  }
  if (timeline.sid === sid && !timeline.searching) timeline.timer = setTimeout(refreshTimeline, TIMELINE_POLL_MS);
}

function openTimeline(sid) {
  timeline.sid = sid;
  timeline.searching = false;
  clearTimeline();
  $("search").value = "";
  $("timeline-title").textContent = `Timeline of ${sid}`;
  $("timeline-close").hidden = false;
  $("search-scope-label").hidden = false;
  $("timeline-status").textContent = "Loading…";
  for (const [id, li] of cards) li.classList.toggle("open", id === sid);
  $("timeline").focus();
  refreshTimeline();
}

function closeTimeline() {
  const sid = timeline.sid;
  timeline.sid = "";
  timeline.searching = false;
  clearTimeline();
  $("timeline-title").textContent = "History";
  $("timeline-close").hidden = true;
  $("search-scope-label").hidden = true;
  $("timeline-status").textContent = "Open a session's timeline from its card, or search the history of every session.";
  for (const li of cards.values()) li.classList.remove("open");
  const card = cards.get(sid);
  if (card) card.querySelector("[data-testid=card-open]").focus();
}

async function search(text) {
  const sid = $("search-scope").checked ? timeline.sid : "";
  if (!text) { // an empty search goes back to the open timeline
    timeline.searching = false;
    clearTimeline();
    if (timeline.sid) refreshTimeline();
    else $("timeline-status").textContent = "Type words to search for.";
    return;
  }
  timeline.searching = true;
  clearTimeline();
  $("timeline-status").textContent = "Searching…";
  try {
    const q = new URLSearchParams({ q: text, limit: String(SEARCH_LIMIT), ...(sid ? { stream: sid } : {}) });
    const [data, clips] = await Promise.all([getJson(`/api/history?${q}`), clipsOf(sid)]);
    addEntries(data.entries, clips, !sid);
    const n = data.entries.length;
    $("timeline-status").textContent = `${n} result${n === 1 ? "" : "s"} for “${text}”`
      + `${sid ? ` in ${sid}` : " in every session"}${data.before ? " (the newest shown)" : ""}.`;
  } catch (err) {
    $("timeline-status").textContent = `The search failed: ${err.message}`;
  }
}

$("timeline-close").addEventListener("click", closeTimeline);
$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  search($("search").value.trim());
});
poll();

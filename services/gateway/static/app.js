// Live captions page: browser audio -> WebRTC -> gateway; captions back on the "captions" data channel.
// Plain ES module, standard APIs only (Chromium and Firefox).

const $ = (id) => document.getElementById(id);
const ui = {
  startMic: $("start-mic"), startTab: $("start-tab"), stop: $("stop"), state: $("state"),
  sessionLabel: $("session-label"), sessionId: $("session-id"), level: $("level"), levelText: $("level-text"),
  error: $("error"), notice: $("notice"), liveWindow: $("live-window"), liveRevision: $("live-revision"),
  liveCaption: $("live-caption"), history: $("history"), downloads: $("downloads"),
  vtt: $("download-vtt"), json: $("download-json"), token: $("token"), settings: $("settings"),
  questionForm: $("question-form"), questionText: $("question-text"), questions: $("questions"),
  alerts: $("alerts"), alertsEmpty: $("alerts-empty"),
};
const STOP_WAIT_MS = 8000; // how long Stop waits for the last caption before closing anyway
const ICE_WAIT_MS = 3000; // the server has no trickle ICE: send the offer once gathering completes

const MAX_QUESTIONS = 8; // the server's limit per session

let current = null; // {pc, dc, tracks, meter, sid, shown, stopTimer, questionsPending}
let questions = []; // [{id, text}]: asked with the next offer, and live while a stream runs
let nextQuestion = 1;
const answers = new Map(); // question id -> the newest answer message shown
let clipUrls = []; // blob: URLs of clips fetched with a token (revoked on reset)

// ---------------------------------------------------------------------------------------------
function setState(state, text) {
  ui.state.textContent = text || state;
  ui.state.dataset.state = state;
}
function showError(message) { ui.error.textContent = message; }
function showNotice(message) { ui.notice.textContent = message; }
function setBusy(running) {
  ui.startMic.disabled = running;
  ui.startTab.disabled = running;
  ui.stop.disabled = !running;
}
function authHeaders() {
  const token = ui.token.value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}
export function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds + 1e-6));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
const span = (a, b) => `[${clock(a)}–${clock(b)}]`;
function el(tag, cls, text, testid) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  if (testid) e.setAttribute("data-testid", testid);
  return e;
}

async function apiError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

// --- audio sources ------------------------------------------------------------------------------
const RAW_AUDIO = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };

function mediaErrorText(err, kind) {
  const what = kind === "mic" ? "the microphone" : "tab audio";
  switch (err && err.name) {
    case "NotAllowedError":
      return kind === "mic"
        ? "Microphone access was blocked. Allow it for this site in the browser's address bar or settings, then try again."
        : "Sharing was cancelled or blocked, so there is no audio to caption.";
    case "NotFoundError":
      return "No microphone was found. Connect one, or share a tab's audio instead.";
    case "NotReadableError":
      return `The browser could not open ${what}; another program may be using it.`;
    case "OverconstrainedError":
      return `The browser could not open ${what} with the requested settings.`;
    case "NotSupportedError":
    case "TypeError":
      return `This browser cannot capture ${what} here.`;
    default:
      return `Could not start ${what}: ${err && err.message ? err.message : err}`;
  }
}

async function openSource(kind) {
  if (!navigator.mediaDevices) {
    throw new Error("Audio capture needs a secure page: open it over https or on localhost.");
  }
  if (kind === "mic") {
    return navigator.mediaDevices.getUserMedia({ audio: RAW_AUDIO, video: false });
  }
  if (!navigator.mediaDevices.getDisplayMedia) {
    const e = new Error("no getDisplayMedia"); e.name = "NotSupportedError"; throw e;
  }
  // Chromium requires video to share a tab; the video track is stopped right away.
  return navigator.mediaDevices.getDisplayMedia({
    video: true, audio: { ...RAW_AUDIO, suppressLocalAudioPlayback: false }, systemAudio: "include",
  });
}

const NO_TAB_AUDIO = "The browser shared no audio. In Chrome or Edge, pick a browser tab and keep "
  + "\"Also share tab audio\" switched on (windows and screens usually carry no audio). Firefox and Safari "
  + "cannot share a tab's audio: use \"Start microphone\" there, or route the sound through a virtual audio device.";

// --- level meter ------------------------------------------------------------------------------
function startMeter(track) {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!Ctx) return null;
  const ctx = new Ctx();
  const source = ctx.createMediaStreamSource(new MediaStream([track]));
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 2048;
  source.connect(analyser); // not connected to the speakers: no echo
  const buf = new Float32Array(analyser.fftSize);
  const meter = { ctx, timer: 0, check: 0 };
  const tick = () => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
    const db = 10 * Math.log10(sum / buf.length + 1e-12);
    const shown = Math.max(-60, Math.min(0, db));
    ui.level.value = shown;
    ui.level.textContent = `${shown.toFixed(0)} dB`;
    ui.levelText.textContent = db <= -60 ? "silent" : `${db.toFixed(0)} dB`;
  };
  meter.timer = setInterval(tick, 100); // setInterval keeps running in background tabs (unlike rAF)
  ctx.resume().catch(() => {});
  // Without an audio output device some browsers never start Web Audio: say so instead of "silent"
  // (and pick up again if the engine starts later).
  meter.check = setTimeout(() => {
    ui.level.dataset.engine = ctx.state;
    if (ctx.state !== "running") {
      clearInterval(meter.timer);
      ui.levelText.textContent = "level unavailable (the browser's audio engine did not start)";
    }
  }, 3000);
  ctx.onstatechange = () => {
    if (ctx.state === "running" && ui.level.dataset.engine && ui.level.dataset.engine !== "running") {
      ui.level.dataset.engine = "running";
      meter.timer = setInterval(tick, 100);
    }
  };
  return meter;
}
function stopMeter(meter) {
  if (!meter) return;
  clearInterval(meter.timer);
  clearTimeout(meter.check);
  meter.ctx.onstatechange = null;
  delete ui.level.dataset.engine;
  meter.ctx.close().catch(() => {});
  ui.level.value = -60;
  ui.levelText.textContent = "–∞ dB";
}

// --- captions ---------------------------------------------------------------------------------
function resetCaptions() {
  ui.history.replaceChildren();
  resetAlerts();
  answers.clear();
  renderQuestions();
  ui.liveCaption.textContent = "Waiting for the first caption…";
  ui.liveCaption.className = "caption interim";
  ui.liveWindow.textContent = "";
  ui.liveRevision.hidden = true;
}

function showLive(msg) {
  ui.liveCaption.textContent = msg.text || "…";
  ui.liveCaption.className = `caption ${msg.is_final ? "final" : "interim"}`;
  ui.liveCaption.dataset.final = msg.is_final ? "1" : "0";
  ui.liveWindow.textContent = span(msg.window_start, msg.window_end);
  ui.liveRevision.hidden = false;
  ui.liveRevision.textContent = msg.is_final ? "final" : `interim · revision ${msg.revision}`;
}

function addFinal(msg) {
  const id = `seg-${msg.segment_id}`;
  let li = ui.history.querySelector(`[data-segment="${msg.segment_id}"]`);
  const list = ui.history;
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  if (!li) {
    li = document.createElement("li");
    li.id = id;
    li.dataset.segment = String(msg.segment_id);
    // keep stream order even if a final arrives late
    const after = [...list.children].find((el) => Number(el.dataset.segment) > msg.segment_id);
    list.insertBefore(li, after || null);
  }
  const time = document.createElement("time");
  time.className = "stamp";
  time.textContent = span(msg.window_start, msg.window_end);
  li.replaceChildren(time, document.createTextNode(msg.text || "(no caption)"));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function onMessage(event) {
  let msg;
  try { msg = JSON.parse(event.data); } catch (_) { return; }
  const cur = current;
  if (!cur) return;
  if (msg.type === "started") {
    cur.sid = msg.session_id;
    if (msg.config && Array.isArray(msg.config.questions) && !cur.questionsPending) setQuestions(msg.config.questions);
    ui.sessionId.textContent = msg.session_id;
    ui.sessionLabel.hidden = false;
    setDownloads(msg.session_id);
  } else if (msg.type === "caption" && msg.question_id) {
    showAnswer(msg); // an answer to a question: never the caption display or the history
  } else if (msg.type === "caption") {
    if (msg.is_final) addFinal(msg);
    if (!cur.shown || msg.window_end >= cur.shown.window_end) {
      cur.shown = msg;
      showLive(msg);
    }
  } else if (msg.type === "alert") {
    addAlert(msg);
  } else if (msg.type === "questions") {
    setQuestions(msg.questions); // the server's answer: the questions now asked
  } else if (msg.type === "error" && msg.reason === "questions") {
    showError(`The questions were not changed: ${msg.message}`);
  } else if (msg.type === "error") {
    showError(msg.message || "The server reported an error.");
  } else if (msg.type === "ended") {
    const why = { end_of_stream: "the stream was stopped", idle: "no audio arrived for a while",
                  error: "of an error" }[msg.reason] || msg.reason || "the server ended it";
    showNotice(`Session ended because ${why}. ${Math.round(msg.audio_seconds || 0)} s of audio captioned.`);
    teardown("ended");
  }
}

function setDownloads(sid) {
  const base = `/api/sessions/${encodeURIComponent(sid)}/captions`;
  ui.vtt.href = `${base}.vtt`;
  ui.json.href = `${base}.json`;
  ui.vtt.setAttribute("download", `${sid}.vtt`);
  ui.json.setAttribute("download", `${sid}.json`);
  ui.downloads.hidden = false;
}

// With a token the download needs the Authorization header: fetch it and save a blob instead.
for (const link of [ui.vtt, ui.json]) {
  link.addEventListener("click", async (ev) => {
    if (!ui.token.value.trim()) return;
    ev.preventDefault();
    const resp = await fetch(link.href, { headers: authHeaders() });
    if (!resp.ok) { showError(`Download failed: ${await apiError(resp)}`); return; }
    const url = URL.createObjectURL(await resp.blob());
    const a = document.createElement("a");
    a.href = url; a.download = link.getAttribute("download") || "captions";
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
}

// --- questions --------------------------------------------------------------------------------
// Each row: the question, a remove button, and its newest answer (text, and a yes/no badge when the
// server read the answer as one). Answers arrive as caption messages with a question_id.
function renderQuestions() {
  ui.questions.replaceChildren(...questions.map((q) => {
    const li = el("li", "question", null, "question-row");
    li.dataset.question = q.id;
    const head = el("div", "question-head");
    const remove = el("button", "small", "Remove", "question-remove");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove the question: ${q.text}`);
    remove.addEventListener("click", () => removeQuestion(q.id));
    head.append(el("span", "question-text", q.text, "question-label"), remove);
    const answer = el("p", "answer", "", "answer");
    li.append(head, answer);
    fillAnswer(li, answers.get(q.id));
    return li;
  }));
  ui.questionText.disabled = questions.length >= MAX_QUESTIONS;
}

function fillAnswer(li, msg) {
  const p = li.querySelector("[data-testid=answer]");
  if (!msg) {
    p.textContent = current ? "waiting for an answer…" : "answered once a stream runs";
    p.className = "answer pending";
    return;
  }
  const parts = [el("time", "stamp", span(msg.window_start, msg.window_end))];
  if (typeof msg.answer === "boolean") {
    const badge = el("span", `badge ${msg.answer ? "yes" : "no"}`, msg.answer ? "yes" : "no", "answer-badge");
    parts.push(badge);
  }
  parts.push(el("span", "answer-text", msg.text || "(no answer)", "answer-text"));
  p.replaceChildren(...parts);
  p.className = `answer ${msg.is_final ? "final" : "interim"}`;
}

function showAnswer(msg) {
  const prev = answers.get(msg.question_id);
  if (prev && msg.window_end < prev.window_end) return; // an older window's late answer
  answers.set(msg.question_id, msg);
  const li = [...ui.questions.children].find((row) => row.dataset.question === msg.question_id);
  if (li) fillAnswer(li, msg);
}

function setQuestions(list) {
  if (!Array.isArray(list)) return;
  questions = list.map(({ id, text }) => ({ id, text }));
  for (const id of [...answers.keys()]) if (!questions.some((q) => q.id === id)) answers.delete(id);
  renderQuestions();
}

function sendQuestions() {
  const cur = current;
  if (!cur) return; // not streaming: the questions go with the next offer
  if (!cur.dc || cur.dc.readyState !== "open") { cur.questionsPending = true; return; }
  cur.questionsPending = false;
  cur.dc.send(JSON.stringify({ type: "questions", questions: questions.map(({ id, text }) => ({ id, text })) }));
}

function addQuestion(text) {
  if (!text) return;
  if (questions.length >= MAX_QUESTIONS) { showError(`At most ${MAX_QUESTIONS} questions.`); return; }
  while (questions.some((q) => q.id === `q${nextQuestion}`)) nextQuestion++;
  questions.push({ id: `q${nextQuestion++}`, text });
  renderQuestions();
  sendQuestions();
}

function removeQuestion(id) {
  questions = questions.filter((q) => q.id !== id);
  answers.delete(id);
  renderQuestions();
  sendQuestions();
  ui.questionText.focus();
}

ui.questionForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  showError("");
  addQuestion(ui.questionText.value.trim());
  ui.questionText.value = "";
});

// --- alerts -----------------------------------------------------------------------------------
// Alerts of this stream's rules arrive on the data channel (rules are set with the monitoring API).
// The clip is served by GET /api/alerts/{id}/clip.wav. On an open gateway the <audio> element loads
// it directly; with an access token it is fetched with the Authorization header and played from a
// blob: URL. The clip needs the "monitor" scope: a key that may only stream gets no clip (the
// element then says so).
export function clipUrl(alertId) { return `/api/alerts/${encodeURIComponent(alertId)}/clip.wav`; }

function resetAlerts() {
  ui.alerts.replaceChildren();
  ui.alertsEmpty.hidden = false;
  clipUrls.forEach((u) => URL.revokeObjectURL(u));
  clipUrls = [];
}

async function loadClip(audio, alertId) {
  const url = clipUrl(alertId);
  if (!ui.token.value.trim()) { audio.src = url; return; }
  try {
    const resp = await fetch(url, { headers: authHeaders() });
    if (!resp.ok) throw new Error(await apiError(resp));
    const blobUrl = URL.createObjectURL(await resp.blob());
    clipUrls.push(blobUrl);
    audio.src = blobUrl;
  } catch (err) {
    audio.replaceWith(el("span", "hint", `The clip could not be loaded: ${err.message}`, "alert-clip-error"));
  }
}

function addAlert(msg) {
  if ([...ui.alerts.children].some((li) => li.dataset.alert === msg.alert_id)) return;
  const li = el("li", "alert", null, "alert");
  li.dataset.alert = msg.alert_id;
  const head = el("p", "alert-head");
  head.append(el("strong", "alert-rule", msg.rule_id, "alert-rule"),
    el("time", "stamp", span(msg.window_start, msg.window_end), "alert-window"));
  if (msg.question_id) head.append(el("span", "badge", `answer to ${msg.question_id}`));
  li.append(head, el("p", "alert-text", msg.text || `(${msg.kind})`, "alert-text"));
  if (msg.has_clip === false) {
    li.append(el("p", "hint", "No audio clip was kept for this alert."));
  } else {
    const audio = el("audio", "clip", null, "alert-clip");
    audio.controls = true;
    audio.preload = "metadata";
    audio.setAttribute("aria-label", `Audio of alert ${msg.rule_id} ${span(msg.window_start, msg.window_end)}`);
    audio.addEventListener("error", () => { audio.title = "The clip could not be loaded."; });
    li.append(audio);
    loadClip(audio, msg.alert_id);
  }
  ui.alerts.prepend(li); // newest first
  ui.alertsEmpty.hidden = true;
}

// --- connection -------------------------------------------------------------------------------
function readSettings() {
  const num = (el) => (el.value === "" ? undefined : Number(el.value));
  return {
    prompt: $("prompt").value.trim() || undefined,
    window_seconds: num($("window")),
    hop_seconds: num($("hop")),
    adapter: $("adapter").value.trim(),
    interim_results: $("interim").checked,
    questions: questions.length ? questions.map(({ id, text }) => ({ id, text })) : undefined,
  };
}

function waitForIce(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, ICE_WAIT_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

async function start(kind) {
  if (current) return;
  showError("");
  showNotice("");
  setBusy(true);
  setState("connecting", kind === "mic" ? "opening the microphone…" : "choosing a tab…");
  sessionStorage.setItem("midasheng-token", ui.token.value.trim());
  let stream;
  try {
    stream = await openSource(kind);
  } catch (err) {
    const insecure = err && err.message && err.message.startsWith("Audio capture needs");
    showError(insecure ? err.message : mediaErrorText(err, kind));
    setBusy(false);
    setState("idle");
    return;
  }
  stream.getVideoTracks().forEach((t) => t.stop());
  const track = stream.getAudioTracks()[0];
  if (!track) {
    showError(kind === "mic" ? "The browser gave no microphone track." : NO_TAB_AUDIO);
    setBusy(false);
    setState("idle");
    return;
  }
  const cur = { pc: null, dc: null, tracks: stream.getTracks(), meter: startMeter(track), sid: "", shown: null,
                stopTimer: 0, questionsPending: false };
  current = cur;
  resetCaptions();
  ui.downloads.hidden = true;
  track.addEventListener("ended", () => {
    if (current === cur && ui.state.dataset.state !== "stopping") {
      showNotice(kind === "tab" ? "Tab sharing stopped." : "The microphone stopped.");
      stop();
    }
  });
  try {
    setState("connecting", "connecting…");
    const cfgResp = await fetch("/api/config", { headers: authHeaders() });
    if (!cfgResp.ok) {
      throw new Error(cfgResp.status === 401
        ? `This server needs a valid access token (${await apiError(cfgResp)}). Enter it under Stream settings.`
        : `The server is not ready: ${await apiError(cfgResp)}`);
    }
    const serverConfig = await cfgResp.json();
    const pc = new RTCPeerConnection({ iceServers: serverConfig.ice_servers || [] });
    cur.pc = pc;
    const dc = pc.createDataChannel("captions", { ordered: true });
    cur.dc = dc;
    dc.addEventListener("message", onMessage);
    dc.addEventListener("open", () => { if (cur.questionsPending) sendQuestions(); });
    pc.addTrack(track, new MediaStream([track]));
    pc.addEventListener("connectionstatechange", () => onConnectionState(cur));
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    if (current !== cur) return;
    const resp = await fetch("/api/webrtc/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, config: readSettings() }),
    });
    if (!resp.ok) {
      const why = await apiError(resp);
      throw new Error(resp.status === 503 ? `The server is busy: ${why}` : resp.status === 401
        ? `This server needs a valid access token (${why}).` : `The server refused the stream: ${why}`);
    }
    const answer = await resp.json();
    cur.sid = answer.session_id;
    ui.sessionId.textContent = answer.session_id;
    ui.sessionLabel.hidden = false;
    setDownloads(answer.session_id);
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    ui.stop.focus();
  } catch (err) {
    showError(err && err.message ? err.message : String(err));
    teardown("failed");
  }
}

function onConnectionState(cur) {
  if (current !== cur || !cur.pc) return;
  const s = cur.pc.connectionState;
  if (s === "connected") {
    setState("live", "live");
  } else if (s === "connecting" || s === "new") {
    setState("connecting", "connecting…");
  } else if (s === "disconnected") {
    setState("connecting", "connection interrupted, waiting…");
  } else if (s === "failed") {
    showError("The connection to the server failed. A firewall may block WebRTC; the server may need a "
      + "TURN server (--ice-server).");
    teardown("failed");
  } else if (s === "closed") {
    teardown("idle");
  }
}

function stop() {
  const cur = current;
  if (!cur) return;
  setState("stopping", "finishing the last caption…");
  ui.stop.disabled = true;
  cur.tracks.forEach((t) => t.stop());
  stopMeter(cur.meter);
  cur.meter = null;
  if (cur.dc && cur.dc.readyState === "open") {
    cur.dc.send(JSON.stringify({ type: "stop" }));
    cur.stopTimer = setTimeout(() => teardown("idle"), STOP_WAIT_MS);
  } else {
    teardown("idle");
  }
}

function teardown(state) {
  const cur = current;
  if (!cur) return;
  current = null;
  clearTimeout(cur.stopTimer);
  cur.tracks.forEach((t) => t.stop());
  stopMeter(cur.meter);
  try { if (cur.dc) cur.dc.close(); } catch (_) { /* already closed */ }
  try { if (cur.pc) cur.pc.close(); } catch (_) { /* already closed */ }
  setBusy(false);
  setState(state === "failed" ? "failed" : "idle", state === "failed" ? "failed" : state === "ended" ? "ended" : "idle");
  if (ui.liveCaption.dataset.final !== "1" && cur.shown) ui.liveCaption.className = "caption final";
}

// The form starts from the server's own defaults (empty fields mean "the server's default").
async function loadDefaults() {
  try {
    const resp = await fetch("/api/config", { headers: authHeaders() });
    if (!resp.ok) return; // e.g. a token is needed first: the fields stay empty
    const { defaults = {}, limits = {} } = await resp.json();
    const fill = (id, value) => { if ($(id).value === "" && value !== undefined) $(id).value = value; };
    fill("prompt", defaults.prompt);
    fill("window", defaults.window_seconds);
    fill("hop", defaults.hop_seconds);
    if (limits.max_prompt_chars) $("prompt").maxLength = limits.max_prompt_chars;
  } catch (_) { /* offline or not ready: the fields stay empty */ }
}

ui.token.value = sessionStorage.getItem("midasheng-token") || "";
loadDefaults();
renderQuestions();
ui.startMic.addEventListener("click", () => start("mic"));
ui.startTab.addEventListener("click", () => start("tab"));
ui.stop.addEventListener("click", stop);
window.addEventListener("pagehide", () => teardown("idle"));
setBusy(false);
setState("idle");

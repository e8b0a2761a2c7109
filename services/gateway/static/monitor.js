// Monitoring view: one card per session, polled from /api/sessions every second.

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const STALE_SECONDS = 15; // a caption older than this marks the card

const token = $("token");
token.value = sessionStorage.getItem("midasheng-token") || "";
token.addEventListener("change", () => sessionStorage.setItem("midasheng-token", token.value.trim()));

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds + 1e-6));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
function ago(seconds) {
  if (seconds == null) return "";
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function card(s, now) {
  const li = el("li", "card");
  li.dataset.session = s.id;
  li.setAttribute("data-testid", "session-card");
  const latest = s.latest;
  const captionAge = latest ? latest.age_seconds + Math.max(0, Date.now() / 1000 - now) : null;
  if (!s.active) li.classList.add("ended");
  else if (captionAge != null && captionAge > STALE_SECONDS) li.classList.add("stale");
  li.append(el("h3", null, s.id));
  const meta = [`${clock(s.audio_seconds)} of audio`, `window ${s.window_seconds} s / every ${s.hop_seconds} s`];
  if (s.adapter) meta.push(`adapter ${s.adapter}`);
  if (s.webrtc) meta.push("browser");
  li.append(el("p", "meta", meta.join(" · ")));
  const text = el("p", `caption ${latest && !latest.is_final ? "interim" : "final"}`,
    latest ? latest.text || "(empty caption)" : "waiting for the first caption…");
  text.setAttribute("data-testid", "card-caption");
  li.append(text);
  if (latest) {
    const line = el("p", "meta");
    const age = el("span", "age", ago(captionAge));
    age.setAttribute("data-testid", "card-age");
    line.append(age, document.createTextNode(
      ` · [${clock(latest.window_start)}–${clock(latest.window_end)}] · `
      + (latest.is_final ? "final" : `interim, revision ${latest.revision}`)));
    li.append(line);
  }
  if (!s.active) {
    const end = el("p", "meta", `ended${s.ended ? ` (${s.ended.reason})` : ""} `);
    const a = el("a", null, "captions (WebVTT)");
    a.href = `/api/sessions/${encodeURIComponent(s.id)}/captions.vtt`;
    end.append(a);
    li.append(end);
  }
  return li;
}

async function poll() {
  try {
    const headers = token.value.trim() ? { Authorization: `Bearer ${token.value.trim()}` } : {};
    const resp = await fetch("/api/sessions", { headers, cache: "no-store" });
    if (!resp.ok) {
      let why = `${resp.status} ${resp.statusText}`;
      try { why = (await resp.json()).error || why; } catch (_) { /* not JSON */ }
      $("error").textContent = resp.status === 401 ? `Enter the access token: ${why}` : `Cannot list sessions: ${why}`;
      return;
    }
    const data = await resp.json();
    $("error").textContent = "";
    $("cards").replaceChildren(...data.sessions.map((s) => card(s, data.now)));
    $("recent").replaceChildren(...data.recent.map((s) => card(s, data.now)));
    $("count").textContent = String(data.sessions.length);
    $("empty").hidden = data.sessions.length > 0;
    $("updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    $("error").textContent = `The gateway does not answer (${err.message}); retrying every second.`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();

// The stt web page: plain JS, no build step, nothing loaded from elsewhere.
// Uses only the public HTTP API: /v1/audio/transcriptions, /v1/jobs, /v1/stream (WebSocket).
"use strict";

const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("stt-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("stt-api-key", keyInput.value.trim());
  checkServer();
  refreshJobs();
});

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try {
      const body = await resp.json();
      if (body.error && body.error.message) message = body.error.message;
    } catch (e) { /* not JSON */ }
    const err = new Error(message);
    err.status = resp.status;
    throw err;
  }
  return resp;
}

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function checkServer() {
  const el = $("#server-status");
  try {
    const models = await (await api("/v1/models")).json();
    setStatus(el, "model: " + models.data.map((m) => m.id).join(", "));
  } catch (e) {
    setStatus(el, e.status === 401 ? "enter an API key" : "server: " + e.message, true);
  }
}

// -- times and subtitle files ----------------------------------------------------------------------

function clock(seconds, sep) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const h = Math.floor(ms / 3600000), m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000), r = ms % 1000;
  const p = (n, w) => String(n).padStart(w, "0");
  return `${p(h, 2)}:${p(m, 2)}:${p(s, 2)}${sep}${p(r, 3)}`;
}

function toSrt(segments) {
  return segments.filter((s) => s.text.trim())
    .map((s, i) => `${i + 1}\n${clock(s.start, ",")} --> ${clock(s.end, ",")}\n${s.text.trim()}\n\n`).join("");
}

function toVtt(segments) {
  return "WEBVTT\n\n" + segments.filter((s) => s.text.trim())
    .map((s) => `${clock(s.start, ".")} --> ${clock(s.end, ".")}\n${s.text.trim()}\n\n`).join("");
}

function download(name, content, type) {
  const url = URL.createObjectURL(content instanceof Blob ? content : new Blob([content], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// -- a file -----------------------------------------------------------------------------------------

let currentFile = null;
let currentResult = null;
const player = $("#player");

function baseName(name) {
  return (name || "transcript").replace(/\.[^.]+$/, "");
}

function renderTranscript(result) {
  const box = $("#transcript");
  box.textContent = "";
  const segments = result.segments || [];
  // Each word goes to exactly one segment: the last one that starts at or before it.
  const bySegment = segments.map(() => []);
  for (const w of result.words || []) {
    let i = segments.length - 1;
    while (i > 0 && segments[i].start > w.start + 0.005) i--;
    if (i >= 0) bySegment[i].push(w);
  }
  segments.forEach((seg, i) => {
    const line = document.createElement("span");
    line.className = "segment";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock(seg.start, ".").slice(3, 8);
    line.appendChild(time);
    if (!bySegment[i].length) line.appendChild(document.createTextNode(seg.text.trim()));
    for (const w of bySegment[i]) {
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = w.word;
      span.dataset.start = w.start;
      span.dataset.end = w.end;
      span.title = `${w.start.toFixed(2)}–${w.end.toFixed(2)} s`;
      line.appendChild(span);
      line.appendChild(document.createTextNode(" "));
    }
    box.appendChild(line);
  });
}

$("#transcript").addEventListener("click", (e) => {
  const word = e.target.closest(".word");
  if (!word) return;
  player.currentTime = parseFloat(word.dataset.start);
  player.play().catch(() => {});
});

player.addEventListener("timeupdate", () => {
  const t = player.currentTime;
  for (const w of document.querySelectorAll("#transcript .word")) {
    w.classList.toggle("playing", !player.paused && t >= +w.dataset.start && t < +w.dataset.end);
  }
});

async function transcribe(file) {
  currentFile = file;
  currentResult = null;
  const status = $("#file-status");
  $("#file-result").hidden = true;
  setStatus(status, `transcribing ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", "whisper-1");
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "word");
  form.append("timestamp_granularities[]", "segment");
  const lang = $("#language").value.trim();
  if (lang) form.append("language", lang);
  const started = performance.now();
  try {
    const result = await (await api("/v1/audio/transcriptions", { method: "POST", body: form })).json();
    currentResult = result;
    player.src = URL.createObjectURL(file);
    renderTranscript(result);
    $("#file-result").hidden = false;
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(status, `${file.name}: ${result.duration.toFixed(1)} s of ${result.language} in ${secs} s`);
    status.dataset.done = "1";
  } catch (e) {
    setStatus(status, e.message, true);
  }
}

$("#file-input").addEventListener("change", (e) => {
  if (e.target.files.length) transcribe(e.target.files[0]);
});
const zone = $("#drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  if (e.dataTransfer.files.length) transcribe(e.dataTransfer.files[0]);
});

$("#download-srt").addEventListener("click", () =>
  download(baseName(currentFile.name) + ".srt", toSrt(currentResult.segments), "application/x-subrip"));
$("#download-vtt").addEventListener("click", () =>
  download(baseName(currentFile.name) + ".vtt", toVtt(currentResult.segments), "text/vtt"));
$("#download-json").addEventListener("click", () =>
  download(baseName(currentFile.name) + ".json", JSON.stringify(currentResult, null, 2), "application/json"));

$("#submit-job").addEventListener("click", async () => {
  const form = new FormData();
  form.append("file", currentFile, currentFile.name);
  form.append("word_timestamps", "true");
  const lang = $("#language").value.trim();
  if (lang) form.append("language", lang);
  try {
    await api("/v1/jobs", { method: "POST", body: form });
    refreshJobs();
  } catch (e) {
    setStatus($("#jobs-status"), e.message, true);
  }
});

// -- live captions ----------------------------------------------------------------------------------

let live = null;

function wsUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

function appendFinal(text, utteranceEnd) {
  const captions = $("#captions");
  const interim = captions.querySelector(".interim");
  const span = document.createElement("span");
  span.className = "final";
  span.textContent = text + " ";
  captions.insertBefore(span, interim);
  if (utteranceEnd) captions.insertBefore(document.createElement("br"), interim);
  interim.textContent = "";
}

async function startLive() {
  const status = $("#live-status");
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (e) {
    setStatus(status, "microphone: " + e.message, true);
    return;
  }
  const mime = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus"].find((m) => MediaRecorder.isTypeSupported(m));
  if (!mime) {
    setStatus(status, "this browser cannot record Opus", true);
    media.getTracks().forEach((t) => t.stop());
    return;
  }
  const key = keyInput.value.trim();
  const ws = new WebSocket(wsUrl("/v1/stream"), key ? ["stt", "openai-insecure-api-key." + key] : []);
  const recorder = new MediaRecorder(media, { mimeType: mime, audioBitsPerSecond: 32000 });
  live = { ws, recorder, media, ended: false };
  $("#captions").innerHTML = '<span class="interim"></span>';
  $("#live-start").disabled = true;
  $("#live-stop").disabled = false;
  setStatus(status, "connecting…");
  ws.onopen = () => {
    const lang = $("#language").value.trim();
    ws.send(JSON.stringify({
      config: { encoding: mime.startsWith("audio/webm") ? "WEBM_OPUS" : "OGG_OPUS", language_code: lang },
      interim_results: true,
    }));
    recorder.start(250);
    setStatus(status, "listening…");
    $("#live-section").dataset.state = "listening";
  };
  recorder.ondataavailable = (e) => {
    if (e.data.size && ws.readyState === WebSocket.OPEN) ws.send(e.data);
  };
  recorder.onstop = () => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
  };
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.error) {
      setStatus(status, msg.error.message, true);
      return;
    }
    for (const r of msg.results || []) {
      if (r.is_final) appendFinal(r.transcript.trim(), r.utterance_end);
      else $("#captions .interim").textContent = r.transcript.trim();
    }
  };
  ws.onclose = (e) => {
    if (live && live.recorder.state !== "inactive") live.recorder.stop();
    media.getTracks().forEach((t) => t.stop());
    $("#live-start").disabled = false;
    $("#live-stop").disabled = true;
    $("#live-section").dataset.state = "stopped";
    if (!status.classList.contains("error")) {
      setStatus(status, e.code === 1000 ? "stopped" : `connection closed (${e.code} ${e.reason || ""})`, e.code !== 1000);
    }
    live = null;
  };
}

function stopLive() {
  if (!live) return;
  setStatus($("#live-status"), "finishing…");
  $("#live-stop").disabled = true;
  if (live.recorder.state !== "inactive") live.recorder.stop(); // the last chunk, then {"type": "end"}
  live.media.getTracks().forEach((t) => t.stop());
}

$("#live-start").addEventListener("click", startLive);
$("#live-stop").addEventListener("click", stopLive);

// -- jobs -------------------------------------------------------------------------------------------

let jobsTimer = null;

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.jobId = job.job_id;
  tr.dataset.status = job.status;
  const cell = (content) => {
    const td = document.createElement("td");
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    tr.appendChild(td);
    return td;
  };
  cell(job.filename || job.job_id.slice(0, 8));
  cell(job.status).className = "st-" + job.status;
  const bar = document.createElement("progress");
  bar.max = Math.max(job.chunks_total, 1);
  bar.value = job.status === "completed" ? bar.max : job.chunks_completed;
  const progress = cell(bar);
  progress.appendChild(document.createTextNode(` ${job.chunks_completed}/${job.chunks_total}`));
  cell(job.create_time ? new Date(job.create_time).toLocaleTimeString() : "");
  const links = document.createElement("span");
  links.className = "links";
  if (job.status === "completed") {
    for (const fmt of ["text", "srt", "vtt", "json"]) {
      const a = document.createElement("a");
      a.href = "#";
      a.textContent = fmt;
      a.className = "transcript-" + fmt;
      a.addEventListener("click", async (e) => {
        e.preventDefault();
        const resp = await api(`/v1/jobs/${job.job_id}/transcript?format=${fmt}`);
        download(`${baseName(job.filename)}.${fmt === "text" ? "txt" : fmt}`, await resp.blob());
      });
      links.appendChild(a);
    }
  } else if (job.status === "queued" || job.status === "running") {
    const b = document.createElement("button");
    b.textContent = "cancel";
    b.addEventListener("click", async () => { await api(`/v1/jobs/${job.job_id}/cancel`, { method: "POST" }); refreshJobs(); });
    links.appendChild(b);
  }
  cell(links);
  return tr;
}

async function refreshJobs() {
  clearTimeout(jobsTimer);
  let active = false;
  try {
    const page = await (await api("/v1/jobs?page_size=20")).json();
    const body = $("#jobs tbody");
    body.textContent = "";
    for (const job of page.jobs) {
      body.appendChild(jobRow(job));
      active = active || job.status === "queued" || job.status === "running";
    }
    setStatus($("#jobs-status"), page.jobs.length ? "" : "no jobs yet");
  } catch (e) {
    setStatus($("#jobs-status"), e.message, true);
  }
  jobsTimer = setTimeout(refreshJobs, active ? 1000 : 5000);
}

checkServer();
refreshJobs();

// The edgevlm playground: a plain client of the server's own OpenAI-compatible API (no build step,
// no libraries). Questions go to POST /v1/chat/completions with "stream": true; the answer comes
// back as server-sent events, one chunk per piece of text, and the last chunk carries the server's
// timings (TTFT, decode speed, what the image and prefix caches saved).
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}) => Object.assign(document.createElement(tag), props);
const MAX_WATCH_ENTRIES = 20;
const state = {
  model: null,       // the id /v1/models names
  image: null,       // {url: data: URI, name} of the chat's image
  messages: [],      // the conversation so far, as OpenAI messages
  controller: null,  // aborts the chat answer being streamed
  stream: null,      // the camera's MediaStream
  videoUrl: null,    // blob: URL of an opened video file
  watch: null,       // {timer, inFlight, sent, skipped, controller} while watching
};

// --- the API ------------------------------------------------------------------------------------

function apiKey() {
  // set by the server's sign-in form when it runs with --api-key
  const m = document.cookie.match(/(?:^|;\s*)edgevlm_key=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : null;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

class ApiError extends Error {}

async function errorMessage(response) {
  // the server's OpenAI-shaped error {"error": {"message": ...}}, else the status line
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function* events(response) {
  // the parsed "data:" payloads of a server-sent-events body, until "data: [DONE]"
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function chat(messages, { signal, onText }) {
  // one streamed chat completion; onText(textSoFar) after every piece
  const body = {
    messages, stream: true, stream_options: { include_usage: true }, temperature: 0,
    max_tokens: Number($("max-tokens").value) || 128,
  };
  if (state.model) body.model = state.model;
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new ApiError(await errorMessage(response));
  const result = { text: "", timings: null, usage: null, finish: null };
  for await (const chunk of events(response)) {
    if (chunk.error) throw new ApiError(chunk.error.message);  // an error after the answer began
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      result.text += choice.delta.content;
      onText(result.text);
    }
    if (choice && choice.finish_reason) result.finish = choice.finish_reason;
    if (chunk.timings) result.timings = chunk.timings;
    if (chunk.usage) result.usage = chunk.usage;
  }
  return result;
}

function describe({ timings: t, usage, finish }) {
  // "TTFT 85 ms · 41.2 tok/s · 12 tokens · image from cache · 80 prompt tokens reused"
  if (!t) return "";
  const parts = [`TTFT ${Math.round(t.ttft_ms)} ms`];
  if (t.decode_tok_s) parts.push(`${t.decode_tok_s.toFixed(1)} tok/s`);
  parts.push(`${t.n_generated} tokens`);
  if (usage) parts.push(`${usage.prompt_tokens} prompt tokens`);
  if (t.images_cached) parts.push("image from cache");
  else if (t.images_encoded) parts.push(`image encoded in ${Math.round(t.vision_ms)} ms`);
  if (t.prefix_reused) parts.push(`${t.prefix_reused} prompt tokens reused`);
  if (finish === "length") parts.push("stopped at max tokens");
  return parts.join(" · ");
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function connect() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new ApiError(await errorMessage(response));
    state.model = (await response.json()).data[0].id;
    const health = await (await fetch("/health")).json();
    $("model").textContent = `model ${state.model} · backend ${health.backend}`;
  } catch (e) {
    $("model").textContent = "not connected";
    showError(e.message);
  }
}

// --- chat about one image ----------------------------------------------------------------------

function addMessage(role, text, image) {
  const li = el("li", { className: role });
  li.append(el("span", { className: "who", textContent: role === "user" ? "You" : "Model" }));
  if (image) li.append(el("img", { src: image, alt: "the image asked about" }));
  li.append(el("p", { className: "text", textContent: text }));
  $("log").append(li);
  scrollLog();
  return li;
}

function scrollLog() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;  // keep the newest text in view
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;  // one answer at a time
  const first = state.messages.length === 0;
  const content = [];
  if (first && state.image) content.push({ type: "image_url", image_url: { url: state.image.url } });
  content.push({ type: "text", text: question });
  const messages = [...state.messages, { role: "user", content }];
  showError(null);
  const asked = addMessage("user", question, first && state.image ? state.image.url : null);
  const li = addMessage("assistant", "");
  const text = li.querySelector(".text");
  li.dataset.state = "streaming";
  li.setAttribute("aria-busy", "true");
  $("question").value = "";
  state.controller = new AbortController();
  setBusy(true);
  try {
    const result = await chat(messages, { signal: state.controller.signal, onText: (t) => { text.textContent = t; scrollLog(); } });
    state.messages = [...messages, { role: "assistant", content: result.text }];
    $("timings").textContent = describe(result);
    li.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: the partial answer stays in the conversation
      state.messages = [...messages, { role: "assistant", content: text.textContent }];
      li.dataset.state = "stopped";
    } else {  // nothing was answered: the question goes back to the box
      asked.remove();
      li.remove();
      $("question").value = question;
      showError(e.message);
    }
  } finally {
    li.removeAttribute("aria-busy");
    state.controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").replaceChildren();
  $("timings").textContent = "";
  showError(null);
}

// --- the image: a file, a drop, or a frame of the camera or a video -------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);  // the file's own bytes; the server decodes (and judges) them
  });
}

function setImage(url, name) {
  state.image = { url, name };
  const preview = $("preview");
  preview.hidden = false;
  preview.alt = `the image: ${name}`;
  preview.src = url;
  $("image-name").textContent = name;
  newChat();  // the prompt template takes one image: a new image starts a new conversation
}

async function openFile(file) {
  if (!file) return;
  if (file.type.startsWith("video/")) return openVideo(file);
  try {
    setImage(await readFile(file), file.name);
  } catch (e) {
    showError(`could not read ${file.name}: ${e.message}`);
  }
}

function showVideo(on) {
  $("video").hidden = !on;
  $("snap").hidden = !on;
  $("media-stop").hidden = !on;
}

async function startCamera() {
  stopMedia();
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (e) {
    showError(`camera: ${e.message}`);
    return;
  }
  $("video").srcObject = state.stream;
  showVideo(true);
  await $("video").play();
}

async function openVideo(file) {
  stopMedia();
  state.videoUrl = URL.createObjectURL(file);
  const video = $("video");
  video.loop = true;
  video.src = state.videoUrl;
  showVideo(true);
  await video.play().catch((e) => showError(`video: ${e.message}`));
}

function stopMedia() {
  stopWatch();
  const video = $("video");
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.stream = state.videoUrl = null;
  video.pause();
  video.srcObject = null;
  video.removeAttribute("src");
  showVideo(false);
}

function frame() {
  // the video's current frame as a JPEG data: URI (null before the first frame)
  const video = $("video");
  if (video.hidden || !video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return canvas.toDataURL("image/jpeg", 0.9);
}

function snap() {
  const url = frame();
  if (url) setImage(url, `frame at ${new Date().toLocaleTimeString()}`);
}

// --- watch: a question per frame, the latest frame wins ------------------------------------------

function watchStatus() {
  const w = state.watch;
  if (w) $("watch-status").textContent = `${w.sent} frames asked about, ${w.skipped} skipped while an answer was coming`;
}

function startWatch(event) {
  event.preventDefault();
  if (!frame()) {
    showError("Start the camera or open a video first.");
    return;
  }
  showError(null);
  const seconds = Math.max(0.1, Number($("watch-interval").value) || 2);
  state.watch = { timer: setInterval(watchTick, seconds * 1000), inFlight: false, sent: 0, skipped: 0,
                  controller: new AbortController() };
  $("watch-start").disabled = true;
  $("watch-stop").disabled = false;
  watchTick();
}

function stopWatch() {
  const w = state.watch;
  if (!w) return;
  clearInterval(w.timer);
  w.controller.abort();
  state.watch = null;
  $("watch-start").disabled = false;
  $("watch-stop").disabled = true;
}

async function watchTick() {
  const w = state.watch;
  if (!w) return;
  if (w.inFlight) {  // never queue frames: this one is dropped, the next tick takes a newer one
    w.skipped += 1;
    watchStatus();
    return;
  }
  const url = frame();
  if (!url) return;
  w.inFlight = true;
  w.sent += 1;
  watchStatus();
  const li = el("li");
  const text = el("p", { className: "text" });
  const info = el("p", { className: "muted" });
  li.append(el("img", { src: url, alt: `frame ${w.sent}` }), text, info);
  li.dataset.state = "streaming";
  $("watch-log").prepend(li);
  while ($("watch-log").children.length > MAX_WATCH_ENTRIES) $("watch-log").lastChild.remove();
  const messages = [{ role: "user", content: [{ type: "image_url", image_url: { url } },
                                               { type: "text", text: $("watch-prompt").value }] }];
  try {
    const result = await chat(messages, { signal: w.controller.signal, onText: (t) => { text.textContent = t; } });
    info.textContent = describe(result);
    li.dataset.state = "done";
  } catch (e) {
    li.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    info.textContent = e.name === "AbortError" ? "stopped" : e.message;
  } finally {
    w.inFlight = false;
  }
}

// --- wiring -------------------------------------------------------------------------------------

function init() {
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) state.controller.abort();
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("file").addEventListener("change", (e) => openFile(e.target.files[0]));
  $("video-file").addEventListener("change", (e) => openFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    openFile(e.dataTransfer.files[0]);
  });
  $("preview").addEventListener("error", () => { $("preview").hidden = true; });
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {  // localhost or HTTPS only
    $("camera-start").hidden = false;
    $("camera-start").addEventListener("click", startCamera);
  } else {
    $("camera-note").hidden = false;
  }
  $("snap").addEventListener("click", snap);
  $("media-stop").addEventListener("click", stopMedia);
  $("watch").addEventListener("submit", startWatch);
  $("watch-stop").addEventListener("click", stopWatch);
  connect();
}

init();

// The playground. It builds its form from GET v1/info, submits an async job (POST v1/jobs),
// optionally from an uploaded image (image-to-image) and a mask painted over it (inpainting),
// follows it over Server-Sent Events (GET v1/jobs/{id}/events, read with fetch so that the API key
// header can be sent; EventSource cannot send headers) and shows the progress, the step previews and
// the final image or the error. Cancel: DELETE v1/jobs/{id}. Every URL is relative to the page, so a
// gateway behind a path prefix works as well.
"use strict";

const KEY_STORAGE = "sd-triton.api-key";
const NUMBER_FIELDS = ["width", "height", "steps", "guidance_scale", "seed", "strength", "clip_skip"];
const POLL_MS = 500;

const $ = (id) => document.getElementById(id);

let current = null; // the job being followed: {id, controller, started}

// ---------- talking to the gateway ----------

class ApiError extends Error {
  constructor(message, field = null, type = "error") {
    super(message);
    this.field = field;
    this.type = type;
  }
}

function requestHeaders(withBody) {
  const headers = {};
  if (withBody) headers["Content-Type"] = "application/json";
  const key = $("api_key").value.trim();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  return headers;
}

// fetch with the API key; a non-2xx answer throws an ApiError with the gateway's message and field
async function call(method, path, { body, signal } = {}) {
  const options = { method, headers: requestHeaders(body !== undefined), signal };
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(path, options);
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON: the status line is all there is
  }
  const error = body && body.error;
  if (error && error.message) return new ApiError(error.message, error.field || null, error.type);
  if (body && typeof body.detail === "string") return new ApiError(body.detail);
  return new ApiError(`HTTP ${response.status} ${response.statusText}`.trim());
}

function jobPath(id) {
  return `v1/jobs/${encodeURIComponent(id)}`;
}

// ---------- Server-Sent Events, parsed by hand ----------

// Feed it text as it arrives (`last`: the stream's final text); it returns the complete events
// ({event, data}) so far; an event the stream ends inside is dropped. Lines end in
// "\n", "\r\n" or "\r"; a blank line ends an event; "event:" names it, "data:" lines make its data.
class SseParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  push(text, last = false) {
    this.buffer += text;
    // a trailing "\r" may be half of a "\r\n": keep its line until the next chunk (or the end) says
    const end = this.buffer.endsWith("\r") && !last ? this.buffer.length - 1 : this.buffer.length;
    const lines = this.buffer.slice(0, end).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + this.buffer.slice(end); // text after the last line ending
    const events = [];
    for (const line of lines) {
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }

  line(line) {
    if (line === "") {
      const event = this.data.length ? { event: this.event || "message", data: this.data.join("\n") } : null;
      this.event = "";
      this.data = [];
      return event;
    }
    if (line.startsWith(":")) return null; // a comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    return null;
  }
}

// Follows the job's event stream; true once a terminal event was shown, false if the stream ended first.
async function followEvents(id, signal) {
  const response = await call("GET", `${jobPath(id)}/events`, { signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  for (;;) {
    const { value, done } = await reader.read();
    const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
    for (const { event, data } of parser.push(text, done)) {
      if (showEvent(event, parseJson(data))) {
        reader.cancel().catch(() => {});
        return true;
      }
    }
    if (done) return false;
  }
}

// The fallback when the stream ends early: ask for the job's status until it is over.
async function pollStatus(id, signal) {
  for (;;) {
    const status = await (await call("GET", jobPath(id), { signal })).json();
    if (status.progress && status.progress.steps) showStep(status.progress);
    if (status.status === "completed") return showResult(status.result);
    if (status.status === "failed") return showFailed(status.error);
    if (status.status === "cancelled") return showCancelled();
    if (status.status === "queued") showQueued(status.queue_position);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return {};
  }
}

// ---------- the form ----------

// The served models (GET v1/models, the default first and selected), then the chosen one's form.
async function loadInfo() {
  try {
    const models = (await (await call("GET", "v1/models")).json()).data;
    const select = $("model");
    const chosen = select.value || models[0].id;
    select.replaceChildren(
      ...models.map((m) => {
        const label = `${m.id}${m.default ? " (default)" : ""}: ${m.architecture}, ${m.native_width}×${m.native_height}`;
        return new Option(label, m.id, false, m.id === chosen);
      })
    );
    await loadModel();
  } catch (error) {
    $("model-info").textContent = `Could not read the served model: ${error.message}`;
  }
}

// The chosen model's limits and defaults (GET v1/info?model=); `reset`: its own size and steps, not the last one's.
async function loadModel(reset = false) {
  const model = $("model").value;
  const info = await (await call("GET", `v1/info?model=${encodeURIComponent(model)}`)).json();
  if (reset) for (const id of ["width", "height", "steps"]) $(id).value = "";
  applyInfo(info);
  const adapters = (await (await call("GET", `v1/loras?model=${encodeURIComponent(model)}`)).json()).data;
  showAdapters(adapters, info.limits);
}

// The model's LoRA adapters (GET v1/loras?model=): a tick and a scale each; none, the fieldset is hidden.
function showAdapters(adapters, limits) {
  const rows = adapters.map((adapter) => {
    const row = document.createElement("div");
    row.className = "adapter";
    const tick = Object.assign(document.createElement("input"), { type: "checkbox", id: `lora-${adapter.name}` });
    tick.dataset.name = adapter.name;
    const label = Object.assign(document.createElement("label"), { htmlFor: tick.id });
    label.textContent = `${adapter.name} (rank ${adapter.rank}, ${adapter.format})`;
    const scale = Object.assign(document.createElement("input"), {
      type: "number", id: `lora-scale-${adapter.name}`, value: "1", step: "0.05", inputMode: "decimal",
    });
    scale.setAttribute("aria-label", `${adapter.name} scale`);
    [scale.min, scale.max] = [-limits.max_lora_scale, limits.max_lora_scale]; // spinner hints; the gateway checks
    row.append(tick, label, scale);
    return row;
  });
  $("adapter-list").replaceChildren(...rows);
  $("adapters").hidden = rows.length === 0;
}

// The ticked adapters as the request's `loras` (a blank scale: the gateway's default, 1).
function readAdapters() {
  const loras = [];
  for (const tick of document.querySelectorAll("#adapter-list input[type=checkbox]:checked")) {
    const scale = $(`lora-scale-${tick.dataset.name}`);
    const text = scale.value.trim();
    if (text === "" && scale.validity.badInput) throw new ApiError(`loras: the scale of ${tick.dataset.name} is not a number`, scale.id);
    loras.push(text === "" ? { name: tick.dataset.name } : { name: tick.dataset.name, scale: Number(text) });
  }
  return loras;
}

function applyInfo(info) {
  const { defaults, limits } = info;
  $("model-info").textContent = `model ${info.model}, native size ${info.native_width}×${info.native_height}`;
  setIfEmpty("width", defaults.width);
  setIfEmpty("height", defaults.height);
  setIfEmpty("steps", defaults.steps);
  setIfEmpty("guidance_scale", defaults.guidance_scale);
  // spinner hints only: the form is `novalidate`, the gateway checks and names the field
  for (const id of ["width", "height"]) {
    $(id).min = limits.spatial_multiple;
    $(id).step = limits.spatial_multiple;
  }
  $("steps").min = 1;

  const select = $("scheduler");
  const chosen = select.value || defaults.scheduler;
  select.replaceChildren(
    ...info.schedulers.map((name) => {
      // "default" runs the checkpoint's own scheduler: show which class that is
      const label = name === "default" ? `default (${info.default_scheduler_class})` : name;
      return new Option(label, name, false, name === chosen);
    })
  );

  $("clip_skip").max = info.max_clip_skip;
  showEmbeddings(info.embeddings || []);

  $("limits").textContent =
    `Width and height: multiples of ${limits.spatial_multiple} up to ${limits.max_side} ` +
    `(${limits.max_pixels} pixels at most); steps: 1 to ${limits.max_steps}; seed blank = random.`;
}

// The model's textual-inversion tokens (`sd-triton embeddings add`): a button each that adds it to the prompt.
function showEmbeddings(embeddings) {
  const buttons = embeddings.map((embedding) => {
    const button = Object.assign(document.createElement("button"), { type: "button", className: "token" });
    button.textContent = embedding.token;
    button.title = `${embedding.vectors} vector(s), ${embedding.format}, from ${embedding.source}`;
    button.addEventListener("click", () => {
      const prompt = $("prompt");
      prompt.value = prompt.value.trim() ? `${prompt.value.trimEnd()} ${embedding.token}` : embedding.token;
      prompt.focus();
    });
    return button;
  });
  $("embedding-list").replaceChildren(...buttons);
  $("embeddings").hidden = buttons.length === 0;
}

function setIfEmpty(id, value) {
  if ($(id).value === "") $(id).value = value;
}

// The /v1/generate body: empty fields are left out, so the gateway's defaults apply (a blank seed is drawn).
function readForm() {
  const body = { prompt: $("prompt").value, preview: true };
  if ($("model").value) body.model = $("model").value;
  const negative = $("negative_prompt").value;
  if (negative.trim()) body.negative_prompt = negative;
  for (const id of NUMBER_FIELDS) {
    const text = $(id).value.trim();
    if (text !== "") body[id] = Number(text);
    else if ($(id).validity.badInput) throw new ApiError(`${id}: not a number`, id);
  }
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if ($("prompt_syntax").value !== "plain") body.prompt_syntax = $("prompt_syntax").value;
  const loras = readAdapters();
  if (loras.length) body.loras = loras;
  if (init.dataUrl) {
    body.image = init.dataUrl; // a data URI, as the gateway takes it
    if (init.painted) body.mask = maskDataUrl();
  } else if (body.strength !== undefined) {
    throw new ApiError("strength: applies to an image; choose one first", "strength");
  }
  return body;
}

// ---------- the image to start from, and the mask painted over it ----------

const init = { dataUrl: null, painted: false }; // the uploaded image (a data URI) and whether paint is on it

function loadImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const image = $("init-image");
    image.onload = () => {
      const canvas = $("mask-canvas");
      canvas.width = image.naturalWidth; // the mask has the image's own size
      canvas.height = image.naturalHeight;
      clearMask();
      init.dataUrl = reader.result;
      $("mask-box").hidden = false;
      // the result has the image's size unless the form asks another (the gateway resizes)
      $("width").value = image.naturalWidth - (image.naturalWidth % 8);
      $("height").value = image.naturalHeight - (image.naturalHeight % 8);
    };
    image.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function removeImage() {
  init.dataUrl = null;
  $("image").value = "";
  $("strength").value = ""; // an image's setting: gone with it
  $("mask-box").hidden = true;
  clearMask();
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  init.painted = false;
}

// White paint where the pointer goes with a button down, in the image's pixels.
function paint(event) {
  if (!(event.buttons & 1)) return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * canvas.width) / box.width;
  const y = ((event.clientY - box.top) * canvas.height) / box.height;
  const radius = (Number($("brush").value) * canvas.width) / box.width / 2;
  const context = canvas.getContext("2d");
  context.fillStyle = "#ffffff";
  context.beginPath();
  context.arc(x, y, radius, 0, 2 * Math.PI);
  context.fill();
  init.painted = true;
}

// The mask as the gateway takes it: a PNG of the image's size, white repainted, black kept.
function maskDataUrl() {
  const painted = $("mask-canvas");
  const mask = document.createElement("canvas");
  mask.width = painted.width;
  mask.height = painted.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#000000";
  context.fillRect(0, 0, mask.width, mask.height);
  context.drawImage(painted, 0, 0);
  return mask.toDataURL("image/png");
}

function loadApiKey() {
  try {
    $("api_key").value = localStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    // storage unavailable (privacy settings): the key lasts as long as the page
  }
}

function saveApiKey() {
  const key = $("api_key").value.trim();
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch (_) {
    // as above
  }
}

// ---------- showing a job ----------

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function resetOutput() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const element of document.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
  $("job").hidden = true;
  $("job-id").textContent = "";
  $("progress-box").hidden = true;
  $("progress").value = 0;
  $("step-text").textContent = "step 0 / 0";
  $("eta").textContent = "";
  $("images").replaceChildren();
  $("details").textContent = "";
}

// Shows one event; true when it ends the job.
function showEvent(name, data) {
  switch (name) {
    case "queued":
      showQueued(data.position);
      return false;
    case "step":
      showStep(data);
      return false;
    case "completed":
      showResult(data.result);
      return true;
    case "failed":
      showFailed(data.error);
      return true;
    case "cancelled":
      showCancelled();
      return true;
    default:
      return false; // an event this page does not know: ignored
  }
}

function showQueued(position) {
  setStatus(position === undefined || position === null ? "Queued." : `Queued, position ${position}.`);
}

function showStep({ step, steps, eta_s: eta, preview }) {
  setStatus("Generating…");
  $("progress-box").hidden = false;
  $("progress").max = steps;
  $("progress").value = step;
  $("step-text").textContent = `step ${step} / ${steps}`;
  $("eta").textContent = typeof eta === "number" ? `ETA ${eta.toFixed(1)} s` : "";
  if (preview) showPreview(preview);
}

function showPreview(src) {
  let img = $("preview");
  if (!img) {
    img = document.createElement("img");
    img.id = "preview";
    img.className = "preview";
    img.alt = "preview of the current step";
    $("images").replaceChildren(img);
  }
  img.src = src;
}

function showResult(result) {
  const seconds = ((performance.now() - current.started) / 1000).toFixed(1);
  setStatus(`Done in ${seconds} s.`);
  $("eta").textContent = "";
  if ($("progress").max > 1 || $("progress").value > 0) $("progress").value = $("progress").max;
  $("images").replaceChildren(...result.images.map(imageFigure));
  const timings = Object.entries(result.timings || {})
    .filter(([, value]) => typeof value === "number")
    .map(([name, value]) => `${name.replace(/_ms$/, "")} ${Math.round(value)} ms`);
  const mode = result.provenance && result.provenance.mode ? ` Mode: ${result.provenance.mode}.` : "";
  $("details").textContent = (timings.length ? `Timings: ${timings.join(", ")}.` : "") + mode;
}

function imageFigure(image) {
  const src = image.base64 ? `data:${image.content_type};base64,${image.base64}` : image.url;
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.className = "result";
  img.src = src;
  img.alt = $("prompt").value;
  img.width = image.width;
  img.height = image.height;
  if (image.width < 256) img.classList.add("pixelated"); // shown at 256 px wide
  const caption = document.createElement("figcaption");
  const seed = document.createElement("span");
  seed.className = "seed";
  seed.textContent = `seed ${image.seed}`;
  const download = document.createElement("a");
  download.href = src;
  download.download = `sd-${image.seed}.${(image.content_type || "image/png").split("/")[1]}`;
  download.textContent = "download";
  caption.append(seed, ` · ${image.width}×${image.height} · `, download);
  figure.append(img, caption);
  return figure;
}

function showFailed(error) {
  setStatus("Failed.");
  showError(new ApiError((error && error.message) || "the job failed", error && error.field, error && error.type));
}

function showCancelled() {
  setStatus("Cancelled.");
  $("eta").textContent = "";
}

function showError(error) {
  $("error").textContent = error.message;
  $("error").hidden = false;
  const input = error.field ? $(error.field) : null;
  if (input && input.form === $("form")) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

// ---------- the buttons ----------

async function generate(event) {
  event.preventDefault();
  if (current) return;
  resetOutput();
  let body;
  try {
    body = readForm();
  } catch (error) {
    showError(error);
    return;
  }
  current = { id: null, controller: new AbortController(), started: performance.now() };
  const { signal } = current.controller;
  setBusy(true);
  setStatus("Submitting…");
  try {
    const job = await (await call("POST", "v1/jobs", { body, signal })).json();
    current.id = job.id;
    $("job-id").textContent = job.id;
    $("job").hidden = false;
    showQueued(job.queue_position);
    if (!(await followEvents(job.id, signal))) await pollStatus(job.id, signal);
  } catch (error) {
    if (error.name === "AbortError") showCancelled();
    else {
      setStatus("Failed.");
      showError(error);
    }
  } finally {
    current = null;
    setBusy(false);
  }
}

async function cancel() {
  if (!current) return;
  if (current.id === null) {
    current.controller.abort(); // not submitted yet
    return;
  }
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  try {
    await call("DELETE", jobPath(current.id));
    // the event stream ends with "cancelled"
  } catch (error) {
    showError(error);
    if (current) $("cancel").disabled = false;
  }
}

function main() {
  loadApiKey();
  $("api_key").addEventListener("input", saveApiKey);
  $("api_key").addEventListener("change", loadInfo); // a key may be what reading the model needed
  $("form").addEventListener("submit", generate);
  $("model").addEventListener("change", () =>
    loadModel(true).catch((error) => {
      $("model-info").textContent = `Could not read the model: ${error.message}`;
    })
  );
  $("cancel").addEventListener("click", cancel);
  $("image").addEventListener("change", () => {
    if ($("image").files.length) loadImage($("image").files[0]);
    else removeImage();
  });
  $("remove-image").addEventListener("click", removeImage);
  $("clear-mask").addEventListener("click", clearMask);
  $("mask-canvas").addEventListener("pointerdown", paint);
  $("mask-canvas").addEventListener("pointermove", paint);
  loadInfo();
}

main();

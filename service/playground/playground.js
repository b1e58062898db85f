// nnserve playground (docs/playground.md): plain DOM, no framework and no build step, so the page works
// offline from the server alone. It talks to the public inference API as any client would.
// Safety: everything that comes from the server or a model (labels, model names, generated text, error
// messages) is inserted with textContent / append(string), never parsed as HTML; the CSP forbids inline script.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  config: { max_upload_bytes: 10 << 20, max_stream_chars: 10000 },
  models: [],        // GET /models
  image: null,       // the Blob sent to /classify and /features
  token: "",         // inference token, typed by the user; memory only
  gallery: null,     // [{index, label, url}]
  galleryBlobs: new Map(),     // index -> PNG Blob
  galleryFeatures: new Map(),  // "name:version" -> Float32Array[] (unit vectors, gallery order)
  generation: null,  // AbortController of the running stream
};

// ---- small helpers --------------------------------------------------------------------------------------

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);  // strings become text nodes
  return node;
}

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

// fetch with the token (if any); a non-2xx answer throws ApiError carrying the server's own message.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `cannot reach the server (${error.message})`, null);
  }
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401 || response.status === 403) $("token-box").open = true;
  throw new ApiError(response.status, message, response.headers.get("Retry-After"));
}

function showError(node, error) {
  if (!error) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  let text = error instanceof ApiError && error.status ? `${error.status}: ${error.message}` : error.message;
  if (error.retryAfter) text += ` (the server says: retry after ${error.retryAfter} s)`;
  node.textContent = text;
  node.hidden = false;
}

const ms = (seconds) => (seconds == null ? "–" : seconds < 0.01 ? `${(seconds * 1e3).toFixed(2)} ms`
  : `${(seconds * 1e3).toFixed(1)} ms`);
const roleModels = (role) => state.models.filter((m) => m.roles && m.roles[role]);

// The request a panel just sent, as a curl command to copy: the API is the product, the page only shows it.
// The token is never written out: $NNSERVE_TOKEN stands for it.
function showCurl(panel, args) {
  const auth = state.token ? ["-H", "Authorization: Bearer $NNSERVE_TOKEN"] : [];
  const quote = (word) => (/^[\w@=.:/+-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\\''")}'`);
  const words = ["curl", "-s", ...auth, ...args].map((word) => (word.includes("$NNSERVE_TOKEN") ? `"${word}"` : quote(word)));
  $(`${panel}-curl`).textContent = words.join(" ");
}

function formCurl(path, fields) {
  const args = ["-F", "image=@your-image.png", ...Object.entries(fields).filter(([, value]) => value)
    .flatMap(([key, value]) => ["-F", `${key}=${value}`])];
  const output = fields.format === "npy" ? ["-o", "features.npy"] : [];  // binary: to a file, not the terminal
  return [...args, ...output, `${location.origin}${path}`];
}

// ---- models and their selectors --------------------------------------------------------------------------

const SELECTORS = {  // panel -> the role a model needs to be offered there
  classify: "scores", features: "features", generate: "tokens",
};
const HINTS = { classify: "classify-meta", features: "features-meta", generate: "generate-stats" };

// Returns whether the selected value changed. Options are rebuilt only when they differ: a list a person
// has open is not closed by the periodic refresh.
function fillSelect(select, options, keep) {
  const signature = JSON.stringify(options);
  if (keep && select.dataset.options === signature) return false;
  select.dataset.options = signature;
  const previous = keep ? select.value : "";
  select.replaceChildren(...options.map(([value, label, disabled]) => {
    const option = el("option", "", label);
    option.value = value;
    option.disabled = Boolean(disabled);
    return option;
  }));
  const usable = options.filter(([, , disabled]) => !disabled).map(([value]) => value);
  select.value = usable.includes(previous) ? previous : (usable[0] ?? "");
  return select.value !== previous;
}

function fillVersions(panel) {
  const model = state.models.find((m) => m.name === $(`${panel}-model`).value);
  const versions = (model && model.versions) || [];
  const split = model && model.traffic && Object.keys(model.traffic.weights || {}).length
    ? "traffic split" : "newest";
  return fillSelect($(`${panel}-version`), [["", `default (${split})`],
    ...versions.map((v) => [v.version, v.state === "ready" ? v.version : `${v.version} (${v.state})`,
      v.state !== "ready"])], true);
}

async function refreshModels() {
  let models;
  try {
    models = (await (await api("/models")).json()).models;
  } catch (error) {
    $("server-status").textContent = `GET /models failed: ${error.message}`;
    return;
  }
  state.models = models;
  const ready = models.filter((m) => m.state === "ready");
  const waiting = models.filter((m) => m.state !== "ready");
  $("server-status").textContent = `${ready.length} model(s) ready: ${ready.map((m) => `${m.name}:${m.version}`)
    .join(", ") || "none"}` + (waiting.length ? ` · ${waiting.map((m) => `${m.name} ${m.state}`).join(", ")}` : "");
  for (const [panel, role] of Object.entries(SELECTORS)) {
    const offered = roleModels(role).map((m) => [m.name, m.name]);
    // Configured but not served yet (still building or failed): shown, not selectable.
    const pending = waiting.map((m) => [m.name, `${m.name} (${m.state})`, true]);
    const changed = fillSelect($(`${panel}-model`), offered.length ? [...offered, ...pending]
      : [["", `no model with ${role}`, true], ...pending], true);
    const versionChanged = fillVersions(panel);
    const hint = $(HINTS[panel]);
    if (!offered.length) {  // say why the panel is empty (make serve builds models in the background)
      hint.textContent = pending.length
        ? `No model for this panel is served yet: ${waiting.map((m) => `${m.name} is ${m.state}`).join(", ")} ` +
          "(GET /readyz says why); it appears here once it is."
        : `No served model has ${role} (GET /models).`;
      hint.dataset.hint = "shown";
    } else if (hint.dataset.hint) {
      hint.textContent = "";
      delete hint.dataset.hint;
    }
    if ((changed || versionChanged) && panel !== "generate") runImagePanel(panel);
  }
  if (!state.generation) $("generate").disabled = !roleModels("tokens").length;
  fillSelect($("burst-model"), ready.filter((m) => m.roles && (m.roles.scores || m.roles.features || m.roles.tokens))
    .map((m) => [m.name, m.name]), true);
}

// ---- the image: a file, a drop, a drawing or a gallery digit ------------------------------------------------

function setImage(blob, caption) {
  const limit = state.config.max_upload_bytes;
  if (blob.size > limit) {  // the API's own limit (GET /playground/config.json): not sent at all
    const error = new Error(`the image has ${blob.size} bytes; the server's limit is ${limit} ` +
      "(NNSERVE_MAX_UPLOAD_BYTES): pick a smaller file");
    showError($("classify-error"), error);
    showError($("features-error"), error);
    return;
  }
  state.image = blob;
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  $("preview-caption").textContent = caption;
  runImagePanel("classify");
  runImagePanel("features");
}

function setupImageInputs() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setImage(file, `${file.name} (${file.size} bytes)`);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) setImage(file, `${file.name} (${file.size} bytes)`);
  });
  $("random-digit").addEventListener("click", () => randomDigit(false));
  setupCanvas();
}

async function randomDigit(onlyIfEmpty) {
  try {
    const gallery = await loadGallery();
    const digit = gallery[Math.floor(Math.random() * gallery.length)];
    const blob = await galleryBlob(digit);
    if (onlyIfEmpty && state.image) return;  // the user chose an image meanwhile
    setImage(blob, `gallery digit #${digit.index}, labelled ${digit.label}`);
  } catch (error) {
    showError($("classify-error"), error);
  }
}

function setupCanvas() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  let hinted = false;  // the "draw here" text is on the canvas (wiped before the first stroke)
  const clear = (hint) => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (hint) {
      ctx.fillStyle = "#555";
      ctx.font = "20px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("draw a digit here", canvas.width / 2, canvas.height / 2);
    }
    hinted = hint;
  };
  clear(true);
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  let drawing = false;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (hinted) clear(false);
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    ctx.beginPath();
    ctx.moveTo(...at(event));
    ctx.lineTo(...at(event));
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    ctx.lineTo(...at(event));
    ctx.stroke();
  });
  const finish = () => {
    if (!drawing) return;
    drawing = false;
    const digit = mnistLayout(canvas);
    if (digit) digit.toBlob((blob) => setImage(blob, "your drawing, as MNIST lays digits out (28x28)"), "image/png");
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  $("clear").addEventListener("click", () => clear(false));
}

// The drawing as MNIST's digits are made (LeCun et al.): the ink's bounding box scaled into a 20x20 box,
// centred in 28x28, white on black. Without it a digit drawn small or off-centre looks nothing like the
// training data. This is the drawing tool's job, not the model's preprocessing (which the server applies).
function mnistLayout(canvas) {
  const { width, height } = canvas;
  const pixels = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  let [left, top, right, bottom] = [width, height, -1, -1];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (pixels[(y * width + x) * 4] > 32) {
        left = Math.min(left, x); right = Math.max(right, x);
        top = Math.min(top, y); bottom = Math.max(bottom, y);
      }
    }
  }
  if (right < 0) return null;
  const [w, h] = [right - left + 1, bottom - top + 1];
  const scale = 20 / Math.max(w, h);
  const out = document.createElement("canvas");
  out.width = out.height = 28;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 28, 28);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(canvas, left, top, w, h, 14 - (w * scale) / 2, 14 - (h * scale) / 2, w * scale, h * scale);
  return out;
}

// ---- classify and features ---------------------------------------------------------------------------------

const latest = { classify: 0, features: 0 };  // answers to older requests are dropped

function runImagePanel(panel) {
  if (!state.image || !$(`${panel}-model`).value) return;
  const ticket = ++latest[panel];
  const run = panel === "classify" ? classify : features;
  run(ticket).catch((error) => { if (ticket === latest[panel]) showError($(`${panel}-error`), error); });
}

// The multipart form of /classify and /features; version "" = the model's default. With ``panel``, shown as curl.
function imageForm(blob, model, version, extra = {}, panel = null) {
  if (panel) {
    const path = panel === "classify" ? "/classify" : "/features";
    showCurl(panel, formCurl(path, { model, version, ...extra }));
  }
  const form = new FormData();
  form.append("image", blob, "image");
  form.append("model", model);
  if (version) form.append("version", version);
  for (const [key, value] of Object.entries(extra)) form.append(key, value);
  return form;
}

function timingText(timings) {
  return Object.entries(timings || {}).map(([stage, value]) => `${stage.replace("_", " ")} ${value} ms`).join(", ");
}

async function classify(ticket) {
  const started = performance.now();
  const response = await api("/classify", { method: "POST", body: imageForm(state.image, $("classify-model").value,
    $("classify-version").value, { top_k: $("classify-topk").value || "5" }, "classify") });
  const answer = await response.json();
  if (ticket !== latest.classify) return;
  const roundTrip = performance.now() - started;
  showError($("classify-error"), null);
  $("classify-bars").replaceChildren(...answer.predictions.map((p) => {
    const bar = el("span", "bar");
    bar.style.width = `${(100 * p.probability).toFixed(1)}%`;
    return el("li", "", el("span", "label", p.label), el("span", "track", bar),
      el("span", "value", `${(100 * p.probability).toFixed(1)}%`));
  }));
  $("classify-meta").textContent = `answered by ${answer.model} in a batch of ${answer.batch_size} · server: ` +
    `${timingText(answer.timings_ms)} · round trip ${roundTrip.toFixed(1)} ms`;
}

// POST /features, binary (.npy) and L2-normalised: cosine similarity is then a dot product.
async function featureVector(blob, model, version, panel = null) {
  const response = await api("/features", { method: "POST",
    body: imageForm(blob, model, version, { normalize: "true", format: "npy" }, panel) });
  return { tag: response.headers.get("X-Model"), vector: parseNpy(await response.arrayBuffer()) };
}

// A float32 .npy file (numpy's format spec, versions 1-3): the header is a Python dict literal.
function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = (major === 1 ? 10 : 12) + headerLength;
  const header = new TextDecoder().decode(bytes.subarray(major === 1 ? 10 : 12, start));
  if (!header.includes("'<f4'")) throw new Error(`unexpected .npy dtype in ${header.trim()}`);
  return new Float32Array(buffer.slice(start));
}

async function loadGallery() {
  if (!state.gallery) state.gallery = (await (await api("/playground/gallery.json")).json()).digits;
  return state.gallery;
}

async function galleryBlob(digit) {
  if (!state.galleryBlobs.has(digit.index)) state.galleryBlobs.set(digit.index, await (await api(digit.url)).blob());
  return state.galleryBlobs.get(digit.index);
}

// The gallery's vectors from exactly the version that answered the query (a traffic split could otherwise
// mix versions), four requests at a time, cached per version.
async function galleryVectors(tag, ticket) {
  if (state.galleryFeatures.has(tag)) return state.galleryFeatures.get(tag);
  const gallery = await loadGallery();
  const [name, version] = tag.split(":");
  const vectors = new Array(gallery.length);
  let next = 0;
  let done = 0;
  const worker = async () => {
    while (next < gallery.length) {
      const digit = gallery[next++];
      vectors[digit.index] = (await featureVector(await galleryBlob(digit), name, version)).vector;
      done += 1;
      if (ticket === latest.features) $("features-meta").textContent = `computing the gallery's vectors with ${tag}: ${done}/${gallery.length}`;
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  state.galleryFeatures.set(tag, vectors);
  return vectors;
}

async function features(ticket) {
  const model = $("features-model").value;
  const query = await featureVector(state.image, model, $("features-version").value, "features");
  if (ticket !== latest.features) return;
  showError($("features-error"), null);
  const vectors = await galleryVectors(query.tag, ticket);
  if (ticket !== latest.features) return;
  const gallery = await loadGallery();
  const scored = vectors.map((vector, index) => {
    let dot = 0;
    for (let i = 0; i < vector.length; i++) dot += vector[i] * query.vector[i];
    return { digit: gallery[index], similarity: dot };
  }).sort((a, b) => b.similarity - a.similarity).slice(0, 8);
  $("neighbours").replaceChildren(...scored.map(({ digit, similarity }) => {
    const image = el("img");
    image.src = digit.url;
    image.alt = `gallery digit ${digit.label}`;
    return el("li", "", image, el("span", "label", digit.label), el("span", "value", similarity.toFixed(3)));
  }));
  $("features-meta").textContent = `${query.vector.length}-d feature vector from ${query.tag} · the 8 nearest of ` +
    `${gallery.length} UCI digits by cosine similarity (label, similarity)`;
}

// ---- generate: a Server-Sent Events stream read with fetch (EventSource cannot POST) ---------------------

function generationRequest() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = {
    model: $("generate-model").value, prompt: $("prompt").value, stream: true,
    max_new_chars: number("max-chars"), temperature: number("temperature"), top_k: number("top-k"),
    top_p: number("top-p"), seed: number("seed"), n: number("samples"),
  };
  if ($("generate-version").value) body.version = $("generate-version").value;
  // "\n" and "\t" typed in the stop field mean a newline and a tab.
  if ($("stop").value) body.stop = $("stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  return body;
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      yield { event, data: data.join("\n") };
    }
  }
}

// The same generation through OpenAI's API (docs/openai.md): the same batcher and seed give the same text.
// JSON strings and numbers are Python literals too. The token is read from $NNSERVE_TOKEN, never written out.
function showOpenAI(body) {
  const py = (value) => JSON.stringify(value);
  const args = [`model=${py(body.version ? `${body.model}:${body.version}` : body.model)}`, `prompt=${py(body.prompt)}`];
  if (body.max_new_chars !== undefined) args.push(`max_tokens=${body.max_new_chars}`);
  for (const key of ["temperature", "top_p", "seed", "n", "stop"]) {
    if (body[key] !== undefined) args.push(`${key}=${py(body[key])}`);
  }
  if (body.top_k !== undefined) args.push(`extra_body={"top_k": ${body.top_k}}`);
  const key = state.token ? 'os.environ["NNSERVE_TOKEN"]' : '"unused"';
  const lines = [
    ...(state.token ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(`${location.origin}/v1`)}, api_key=${key})`,
    "stream = client.completions.create(",
    `    ${args.join(", ")}, stream=True)`,
  ];
  if ((body.n || 1) === 1) {
    lines.push("for chunk in stream:", '    print(chunk.choices[0].text, end="", flush=True)', "print()");
  } else {
    lines.push("texts = {}", "for chunk in stream:", "    for choice in chunk.choices:",
      '        texts[choice.index] = texts.get(choice.index, "") + choice.text',
      "for index in sorted(texts):", '    print(f"--- sample {index}:\\n{texts[index]}")');
  }
  $("generate-openai").textContent = lines.join("\n");
}

async function generate() {
  const body = generationRequest();
  showCurl("generate", ["-N", `${location.origin}/generate`, "-H", "Content-Type: application/json",
    "-H", "Accept: text/event-stream", "-d", JSON.stringify(body)]);
  showOpenAI(body);
  const controller = new AbortController();
  state.generation = controller;
  $("generate").disabled = true;
  $("stop-generation").disabled = false;
  showError($("generate-error"), null);
  const outputs = Array.from({ length: body.n || 1 }, () => el("span", "generated"));
  $("generate-output").replaceChildren(...outputs.map((output) => el("pre", "sample", el("span", "prompt", body.prompt), output)));
  const stats = $("generate-stats");
  let chars = 0;
  let firstAt = null;
  const started = performance.now();
  const show = (tail) => {
    const seconds = firstAt === null ? 0 : (performance.now() - firstAt) / 1e3;
    const rate = seconds > 0 ? `${Math.round(chars / seconds)} chars/s` : "";
    stats.textContent = [`${chars} chars`, rate, firstAt === null ? "" : `first chars after ${(firstAt - started).toFixed(0)} ms`, tail]
      .filter(Boolean).join(" · ");
  };
  show("waiting for the first characters");
  try {
    const response = await api("/generate", { method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" } });
    const seed = response.headers.get("X-Seed");
    for await (const { event, data } of serverSentEvents(response)) {
      if (firstAt === null) firstAt = performance.now();
      if (event === "message" || event === "choice") {
        const part = event === "choice" ? JSON.parse(data) : { index: 0, text: data };
        outputs[part.index].append(part.text);  // text, never HTML
        chars += part.text.length;
        show(`model ${response.headers.get("X-Model")}, seed ${seed}`);
      } else if (event === "end") {
        const end = JSON.parse(data);
        const reasons = end.choices ? end.choices.map((c) => c.finish_reason).join(", ") : end.finish_reason;
        show(`done (${reasons}) · model ${end.model}, seed ${seed}`);  // the header: JSON numbers lose digits
      } else if (event === "error") {
        throw new Error(`the stream failed: ${JSON.parse(data).error}`);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") show("stopped: the stream was cancelled and its slot freed on the server");
    else { showError($("generate-error"), error); show("failed"); }
  } finally {
    state.generation = null;
    $("generate").disabled = !roleModels("tokens").length;
    $("stop-generation").disabled = true;
  }
}

// ---- live: /metrics every second ----------------------------------------------------------------------------

const HISTORY = 60;  // points per sparkline (a minute)
const WINDOW = 5;    // latency quantiles and mean batch size over the last 5 polls: a lone request still shows
const live = { previous: null, at: 0, series: new Map(), recent: new Map() };
// series: model -> {rps, p50, p95, batch: number[]}; recent: model -> the last WINDOW polls' increases

// Prometheus text format -> [{name, labels, value}] (the lines of the metrics nnserve exports).
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line.startsWith("nnserve_")) continue;
    const match = /^([a-z_]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/([a-z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[key] = value;
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// Per model: requests, latency histogram buckets {le: count} and batch-size sum/count, summed over labels.
function totals(samples) {
  const out = new Map();
  const of = (model) => {
    if (!out.has(model)) out.set(model, { requests: 0, buckets: new Map(), batchSum: 0, batchCount: 0 });
    return out.get(model);
  };
  for (const { name, labels, value } of samples) {
    if (!labels.model || labels.model === "unknown") continue;
    const t = of(labels.model);
    if (name === "nnserve_requests_total") t.requests += value;
    else if (name === "nnserve_request_duration_seconds_bucket") {
      const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
      t.buckets.set(le, (t.buckets.get(le) || 0) + value);
    } else if (name === "nnserve_batch_size_sum") t.batchSum += value;
    else if (name === "nnserve_batch_size_count") t.batchCount += value;
  }
  return out;
}

// histogram_quantile over bucket increases (linear inside a bucket, as Prometheus does).
function quantile(q, buckets) {
  const bounds = [...buckets.keys()].sort((a, b) => a - b);
  const total = buckets.get(Infinity) || 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const bound of bounds) {
    const count = buckets.get(bound);
    if (count >= rank) {
      if (bound === Infinity) return lower;
      return lower + (bound - lower) * ((rank - below) / Math.max(count - below, 1e-9));
    }
    lower = bound;
    below = count;
  }
  return null;
}

const increase = (now, before) => (now >= before ? now - before : now);  // a counter reset: a restarted server

async function pollMetrics() {
  let text;
  try {
    text = await (await api("/metrics")).text();
  } catch (error) {
    $("live-note").textContent = `GET /metrics failed: ${error.message}`;
    return;
  }
  const now = performance.now();
  const current = totals(parseMetrics(text));
  if (live.previous) {
    const seconds = (now - live.at) / 1e3;
    for (const [model, t] of current) {
      const before = live.previous.get(model) || { requests: 0, buckets: new Map(), batchSum: 0, batchCount: 0 };
      const step = {
        requests: increase(t.requests, before.requests),
        buckets: new Map([...t.buckets].map(([le, count]) => [le, increase(count, before.buckets.get(le) || 0)])),
        batchSum: increase(t.batchSum, before.batchSum), batchCount: increase(t.batchCount, before.batchCount),
      };
      const recent = live.recent.get(model) || [];
      recent.push(step);
      if (recent.length > WINDOW) recent.shift();
      live.recent.set(model, recent);
      const buckets = new Map();
      for (const r of recent) for (const [le, n] of r.buckets) buckets.set(le, (buckets.get(le) || 0) + n);
      const batches = recent.reduce((sum, r) => sum + r.batchCount, 0);
      const point = {
        rps: step.requests / seconds,
        p50: quantile(0.5, buckets), p95: quantile(0.95, buckets),
        batch: batches > 0 ? recent.reduce((sum, r) => sum + r.batchSum, 0) / batches : null,
      };
      if (!live.series.has(model)) live.series.set(model, { rps: [], p50: [], p95: [], batch: [] });
      const series = live.series.get(model);
      for (const key of Object.keys(series)) {
        series[key].push(point[key]);
        if (series[key].length > HISTORY) series[key].shift();
      }
    }
    renderLive();
  }
  live.previous = current;
  live.at = now;
  $("live-note").textContent = "Every worker's metrics, merged by the server. Requests/s: the last second; " +
    `latency inside the service (nnserve_request_duration_seconds) and batch size (items per ONNX Runtime call; ` +
    `streams per decode step for text) over the last ${WINDOW} s.`;
}

// The newest point at the right edge; a gap where there was nothing to measure; the scale is the line's maximum.
function sparkline(values, format) {
  const canvas = el("canvas", "spark");
  canvas.width = 120;
  canvas.height = 28;
  const ctx = canvas.getContext("2d");
  const top = Math.max(...values.filter((v) => v !== null), 1e-9);
  const step = (canvas.width - 4) / (HISTORY - 1);
  const x = (i) => canvas.width - 2 - (values.length - 1 - i) * step;
  const y = (v) => canvas.height - 2 - (v / top) * (canvas.height - 4);
  ctx.strokeStyle = ctx.fillStyle = "#2f7ed8";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    if (v === null) return;
    if (i > 0 && values[i - 1] !== null) ctx.lineTo(x(i), y(v));
    else if (i + 1 < values.length && values[i + 1] !== null) ctx.moveTo(x(i), y(v));
    else ctx.fillRect(x(i) - 1, y(v) - 1, 2.5, 2.5);  // a lone point
  });
  ctx.stroke();
  const last = values[values.length - 1];
  return el("td", "", canvas, el("span", "value", last === null || last === undefined ? "–" : format(last)));
}

function renderLive() {
  const rows = [...live.series].sort(([a], [b]) => a.localeCompare(b)).map(([model, s]) => {
    const row = el("tr", "", el("th", "", model), sparkline(s.rps, (v) => v.toFixed(1)), sparkline(s.p50, ms),
      sparkline(s.p95, ms), sparkline(s.batch, (v) => v.toFixed(2)));
    row.dataset.model = model;
    return row;
  });
  $("live-table").tBodies[0].replaceChildren(...rows);
}

// N requests to one model, BURST_LANES in flight at a time. A browser keeps at most 6 HTTP/1.1 connections to a
// server: the sixth stays free for the live panel's polls. Enough to see batches of several requests form; a
// load generator (make bench) shows larger ones in this panel too.
const BURST_LANES = 5;
async function burst() {
  const model = state.models.find((m) => m.name === $("burst-model").value);
  if (!model) return;
  const count = Math.max(1, Math.min(1000, Number($("burst-count").value) || 1));
  $("burst").disabled = true;
  showError($("burst-error"), null);
  const started = performance.now();
  try {
    let send;
    if (model.roles.tokens) {
      send = (i) => api("/generate", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: model.name, prompt: " ", max_new_chars: 50, seed: i }) });
    } else {
      const image = state.image || await galleryBlob((await loadGallery())[0]);
      const path = model.roles.scores ? "/classify" : "/features";
      send = () => api(path, { method: "POST", body: imageForm(image, model.name, "") });
    }
    const statuses = new Map();
    const sizes = new Map();
    let failure = null;
    let next = 0;
    const lane = async () => {
      while (next < count) {
        const i = next++;
        try {
          const answer = await (await send(i)).json();
          statuses.set(200, (statuses.get(200) || 0) + 1);
          if (answer.batch_size) sizes.set(answer.batch_size, (sizes.get(answer.batch_size) || 0) + 1);
        } catch (error) {
          statuses.set(error.status || "network", (statuses.get(error.status || "network") || 0) + 1);
          failure = failure || error;
        }
      }
    };
    await Promise.all(Array.from({ length: BURST_LANES }, lane));
    const seconds = (performance.now() - started) / 1e3;
    const answers = [...statuses].map(([status, n]) => `${n} × ${status}`).join(", ");
    const batches = [...sizes].sort(([a], [b]) => a - b).map(([size, n]) => `${n} in batches of ${size}`).join(", ");
    $("burst-result").textContent = `${count} requests to ${model.name}, ${BURST_LANES} at a time, in ` +
      `${seconds.toFixed(2)} s: ${answers}` +
      (batches ? ` · ${batches}` : "");
    if (failure) showError($("burst-error"), failure);
  } catch (error) {
    showError($("burst-error"), error);
  } finally {
    $("burst").disabled = false;
  }
}

// ---- start ---------------------------------------------------------------------------------------------

async function start() {
  setupImageInputs();
  $("token").addEventListener("change", () => { state.token = $("token").value.trim(); refreshModels(); });
  $("token-form").addEventListener("submit", (event) => event.preventDefault());  // Enter: the change above
  for (const panel of ["classify", "features"]) {
    $(`${panel}-model`).addEventListener("change", () => { fillVersions(panel); runImagePanel(panel); });
    $(`${panel}-version`).addEventListener("change", () => runImagePanel(panel));
  }
  $("classify-topk").addEventListener("change", () => runImagePanel("classify"));
  $("generate-model").addEventListener("change", () => fillVersions("generate"));
  $("generate").addEventListener("click", generate);
  $("stop-generation").addEventListener("click", () => state.generation && state.generation.abort());
  $("burst").addEventListener("click", burst);
  try {
    state.config = await (await api("/playground/config.json")).json();
  } catch (error) {
    $("server-status").textContent = error.message;
  }
  $("upload-limit").textContent = `up to ${(state.config.max_upload_bytes / 1048576).toFixed(1)} MiB, as the API`;
  $("max-chars").max = state.config.max_stream_chars;
  await refreshModels();
  randomDigit(true);  // something to look at from the first second
  setInterval(refreshModels, 5000);  // models that join (make serve builds them in the background) appear
  pollMetrics();
  setInterval(pollMetrics, 1000);
}

start();

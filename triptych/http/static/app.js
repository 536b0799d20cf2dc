// The page: a form for the gateway's images API, live progress and previews, a gallery, the cluster.
// It speaks the same API as any client: /v1/models, /v1/status and the server-sent events of
// POST /v1/images/generations/events. With --api-keys it sends the key typed above (kept in localStorage).
"use strict";

const $ = (selector) => document.querySelector(selector);
const form = $("#generate");
const keyInput = $("#api-key");
const KEY_STORAGE = "triptych.apiKey";
const STATUS_EVERY_MS = 3000;
let running = null; // the AbortController of the generation in progress

// --- talking to the gateway ---------------------------------------------------------------

function headers(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || message;
    } catch (ignored) {
      // not JSON: keep the status line
    }
    if (response.status === 401) message += " (enter the API key at the top)";
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

// Server-sent events from a fetch body: yields {event, data} as each block arrives.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event: name, data: JSON.parse(data.join("\n")) };
    }
  }
}

function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

// --- models and their options ---------------------------------------------------------------

async function loadModels() {
  const select = $("#model");
  const wanted = select.value;
  try {
    const models = (await (await api("/v1/models")).json()).data;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === wanted)) select.value = wanted;
    showError(models.length ? "" : "no model is served yet: start some nodes");
    await loadOptions();
  } catch (error) {
    showError(error.message);
  }
}

// The options a model offers: its samplers (from its model card).
async function loadOptions() {
  const model = $("#model").value;
  const select = $("#sampler");
  const wanted = select.value;
  const samplers = model ? (await (await api(`/v1/models/${encodeURIComponent(model)}`)).json()).samplers || [] : [];
  select.replaceChildren(new Option("the model's own", ""), ...samplers.map((s) => new Option(s, s)));
  if (samplers.includes(wanted)) select.value = wanted;
}

// --- generating -------------------------------------------------------------------------------

function number(name) {
  const value = form.elements[name].value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const width = number("width");
  const height = number("height");
  if ((width === undefined) !== (height === undefined)) throw new Error("give both width and height, or neither");
  const body = {
    prompt: form.elements.prompt.value,
    model: form.elements.model.value || undefined,
    n: number("n") || 1,
    size: width === undefined ? "auto" : `${width}x${height}`,
    seed: number("seed"),
    num_inference_steps: number("steps"),
    guidance_scale: number("guidance"),
    negative_prompt: form.elements.negative_prompt.value || undefined,
    scheduler: form.elements.scheduler.value || undefined,
  };
  return JSON.stringify(body);
}

function showProgress(data) {
  const stage = data.total > 0 ? `${data.stage} ${data.step}/${data.total}` : `${data.stage} started`;
  $("#stage").textContent = `${stage} on ${data.node}`;
  if (data.total > 0) $("#bar").value = data.step / data.total;
  const previews = $("#previews");
  data.previews.forEach((b64, index) => {
    let img = previews.children[index];
    if (!img) {
      img = document.createElement("img");
      img.alt = `preview of image ${index}`;
      previews.append(img);
    }
    img.src = `data:image/png;base64,${b64}`;
  });
}

const SHOWN = [
  ["seed", "seed"],
  ["steps", "steps"],
  ["guidance", "guidance"],
  ["size", null],
  ["sampler", "scheduler"],
  ["model", "model"],
];

function addImage(data) {
  const url = URL.createObjectURL(pngBlob(data.b64_json));
  const params = { ...data.params, seed: data.seed };
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = params.prompt || "generated image";
  img.dataset.seed = String(data.seed);
  const caption = document.createElement("figcaption");
  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = params.prompt;
  const list = document.createElement("dl");
  for (const [label, key] of SHOWN) {
    const value = key ? params[key] : `${params.width}x${params.height}`;
    if (value === null || value === undefined || value === "") continue;
    const term = document.createElement("dt");
    term.textContent = label;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    list.append(term, detail);
  }
  const links = document.createElement("div");
  links.className = "links";
  const download = document.createElement("a");
  download.href = url;
  download.download = `triptych-${data.seed}.png`;
  download.textContent = "download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "reuse these settings";
  reuse.addEventListener("click", () => reuseSettings(params));
  links.append(download, reuse);
  caption.append(prompt, list, links);
  for (const warning of data.warnings || []) {
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = warning;
    caption.append(note);
  }
  figure.append(img, caption);
  $("#gallery").prepend(figure);
}

async function reuseSettings(params) {
  const fields = form.elements;
  fields.prompt.value = params.prompt || "";
  fields.negative_prompt.value = params.negative_prompt || "";
  fields.width.value = params.width ?? "";
  fields.height.value = params.height ?? "";
  fields.steps.value = params.steps ?? "";
  fields.guidance.value = params.guidance ?? "";
  fields.seed.value = params.seed ?? "";
  fields.n.value = 1;
  if ([...fields.model.options].some((o) => o.value === params.model)) {
    fields.model.value = params.model;
    await loadOptions();
  }
  const sampler = [...fields.scheduler.options].some((o) => o.value === params.scheduler) ? params.scheduler : "";
  fields.scheduler.value = sampler;
  fields.prompt.focus();
}

function setRunning(controller) {
  running = controller;
  $("#submit").disabled = controller !== null;
  $("#cancel").hidden = controller === null;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  let body;
  try {
    body = requestBody();
  } catch (error) {
    showError(error.message);
    return;
  }
  const controller = new AbortController();
  setRunning(controller);
  $("#progress").hidden = false;
  $("#previews").replaceChildren();
  $("#bar").value = 0;
  $("#stage").textContent = "sending";
  try {
    const response = await api("/v1/images/generations/events", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body,
      signal: controller.signal,
    });
    for await (const { event: name, data } of events(response)) {
      if (name === "queued") $("#stage").textContent = "queued";
      else if (name === "progress") showProgress(data);
      else if (name === "image") addImage(data);
      else if (name === "error") showError(data.error.message);
    }
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    setRunning(null);
    $("#progress").hidden = true;
    refreshStatus();
  }
}

// --- the cluster --------------------------------------------------------------------------------

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
}

function table(heads, rows) {
  const element = document.createElement("table");
  const head = element.createTHead().insertRow();
  for (const text of heads) {
    const th = document.createElement("th");
    th.textContent = text;
    head.append(th);
  }
  const body = element.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    row.forEach(([text, className]) => cell(tr, text, className));
  }
  return element;
}

const SERVICE_ORDER = ["encoder", "denoiser", "decoder"];
const seconds = (value) => (value === null || value === undefined ? "–" : `${value.toFixed(2)} s`);

function renderStatus(status) {
  const nodes = [...status.nodes].sort(
    (a, b) => a.model.localeCompare(b.model) || SERVICE_ORDER.indexOf(a.service) - SERVICE_ORDER.indexOf(b.service),
  );
  const parts = [];
  if (!nodes.length) {
    const empty = document.createElement("p");
    empty.className = "muted";
    empty.textContent = "no nodes registered";
    parts.push(empty);
  } else {
    parts.push(
      table(
        ["model", "node", "state", "jobs", "done", "per job"],
        nodes.map((n) => [
          [n.model],
          [`${n.service} ${n.node}`],
          [n.state, `state-${n.state}`],
          [String(n.jobs_in_progress ?? 0)],
          [String(n.jobs_done)],
          [seconds(n.mean_job_s)],
        ]),
      ),
    );
  }
  // Stage times: each stage's mean job time over its nodes, per model.
  const stages = new Map();
  for (const n of nodes) {
    if (n.mean_job_s === null || n.mean_job_s === undefined) continue;
    const key = `${n.model}\u0000${n.service}`;
    const entry = stages.get(key) || { model: n.model, service: n.service, total: 0, count: 0 };
    entry.total += n.mean_job_s;
    entry.count += 1;
    stages.set(key, entry);
  }
  if (stages.size) {
    const title = document.createElement("h2");
    title.textContent = "Stage times";
    parts.push(
      title,
      table(
        ["model", "stage", "mean"],
        [...stages.values()].map((s) => [[s.model], [s.service], [seconds(s.total / s.count)]]),
      ),
    );
  }
  const queues = Object.entries(status.queues).filter(([, depth]) => depth > 0);
  const summary = document.createElement("p");
  summary.className = "muted";
  const queued = queues.map(([name, depth]) => `${name}: ${depth}`).join(", ") || "none";
  summary.textContent = `requests in flight: ${status.requests_in_flight} · queued: ${queued}`;
  parts.push(summary);
  $("#cluster-body").replaceChildren(...parts);
}

async function refreshStatus() {
  try {
    renderStatus(await (await api("/v1/status")).json());
  } catch (error) {
    const message = document.createElement("p");
    message.className = "muted";
    message.textContent = error.message;
    $("#cluster-body").replaceChildren(message);
  }
}

// --- wiring ---------------------------------------------------------------------------------------

keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  loadModels();
  refreshStatus();
});
$("#model").addEventListener("change", () => loadOptions().catch((error) => showError(error.message)));
$("#dice").addEventListener("click", () => {
  form.elements.seed.value = Math.floor(Math.random() * 2 ** 32);
});
$("#cancel").addEventListener("click", () => running && running.abort());
form.addEventListener("submit", generate);

loadModels();
refreshStatus();
setInterval(refreshStatus, STATUS_EVERY_MS);

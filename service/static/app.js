// The try-it page: a plain client of POST /predict and GET /model. URLs are relative to the page, so it
// also works behind a proxy that serves the service under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);

const ui = {
  file: $("file"),
  dropZone: $("drop-zone"),
  preview: $("preview"),
  previewImage: $("preview-image"),
  previewCaption: $("preview-caption"),
  canvas: $("canvas"),
  clear: $("clear"),
  topK: $("top-k"),
  announce: $("announce"),
  bars: $("bars"),
  distribution: $("distribution"),
  distributionRows: $("distribution-rows"),
  latency: $("latency"),
  modelStatus: $("model-status"),
  modelCard: $("model-card"),
  keyForm: $("key-form"),
  key: $("api-key"),
};

let labels = null; // from GET /model; the full distribution is in label order
let lastInput = null; // {body, type, name}: re-sent when "Classes to show" changes
let latestRequest = 0; // answers to older requests are dropped
let apiKey = ""; // asked for only when the service answers 401; kept in this tab's memory, never stored

const withKey = (headers = {}) => (apiKey ? { ...headers, Authorization: `Bearer ${apiKey}` } : headers);

// --- sending ------------------------------------------------------------------------------------

async function classify(body, type, name) {
  lastInput = { body, type, name };
  const request = ++latestRequest;
  const topK = Math.max(1, Math.min(1000, parseInt(ui.topK.value, 10) || 5));
  showPending(name);
  const started = performance.now();
  let response;
  let answer;
  try {
    const headers = withKey({ "Content-Type": type });
    response = await fetch(`predict?top_k=${topK}`, { method: "POST", headers, body });
    answer = await response.json().catch(() => null);
  } catch (err) {
    if (request === latestRequest) showError(`Could not reach the service (${err.message}).`);
    return;
  }
  const roundTrip = performance.now() - started;
  if (request !== latestRequest) return;
  if (!response.ok) {
    showError(`The service answered ${response.status}: ${detailOf(answer, response)}`);
    if (response.status === 401) askForKey();
    return;
  }
  showPrediction(answer, response.headers.get("Server-Timing"), roundTrip, name);
}

function classifyFile(file) {
  if (!file) return;
  if (ui.preview.dataset.url) URL.revokeObjectURL(ui.preview.dataset.url);
  const url = URL.createObjectURL(file);
  ui.preview.dataset.url = url;
  ui.previewImage.src = url;
  ui.previewImage.alt = `The chosen image, ${file.name || "pasted"}`;
  ui.previewCaption.textContent = `${file.name || "pasted image"} (${file.type || "unknown type"}, ${formatBytes(file.size)})`;
  ui.preview.hidden = false;
  // The file's own content type, so the service can refuse what is not an image (415).
  classify(file, file.type || "application/octet-stream", file.name || "the pasted image");
}

const detailOf = (answer, response) =>
  (answer && typeof answer.detail === "string" ? answer.detail : response.statusText);

// --- showing ------------------------------------------------------------------------------------

function showPending(name) {
  ui.announce.classList.remove("error");
  ui.announce.textContent = `Classifying ${name}…`;
}

function showError(message) {
  ui.announce.classList.add("error");
  ui.announce.textContent = message;
  ui.bars.hidden = true;
  ui.distribution.hidden = true;
  ui.latency.hidden = true;
}

function showPrediction(answer, serverTiming, roundTrip, name) {
  const prediction = answer.predictions[0];
  const best = prediction.top_k[0];
  ui.announce.classList.remove("error");
  ui.announce.textContent = `${name}: ${best.label} (${percent(best.probability)})`;

  ui.bars.replaceChildren(...prediction.top_k.map(barRow));
  ui.bars.hidden = false;

  ui.distributionRows.replaceChildren(
    ...prediction.probabilities.map((p, i) => tableRow(labels ? labels[i] : String(i), p)),
  );
  ui.distribution.querySelector("summary").textContent = `All ${prediction.probabilities.length} classes`;
  ui.distribution.hidden = false;

  const stages = parseServerTiming(serverTiming);
  const parts = [];
  if ("total" in stages) {
    const detail = ["decode", "preprocess", "queue", "infer"].filter((s) => s in stages)
      .map((s) => `${s} ${ms(stages[s])}`).join(", ");
    parts.push(`Service: ${ms(stages.total)}${detail ? ` (${detail})` : ""}`);
  }
  parts.push(`round trip: ${ms(roundTrip)}`);
  parts.push(`ran on ${providerName(answer.provider)}`);
  ui.latency.textContent = parts.join(" · ");
  ui.latency.hidden = false;
}

function barRow(entry) {
  const row = document.createElement("li");
  const label = document.createElement("span");
  label.className = "bar-label";
  label.textContent = entry.label;
  const track = document.createElement("span");
  track.className = "bar-track";
  track.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${(entry.probability * 100).toFixed(2)}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(entry.probability);
  row.append(label, track, value);
  return row;
}

function tableRow(label, p) {
  const row = document.createElement("tr");
  const name = document.createElement("th");
  name.scope = "row";
  name.textContent = label;
  const value = document.createElement("td");
  value.textContent = p < 0.0001 ? "<0.01%" : `${(p * 100).toFixed(2)}%`;
  row.append(name, value);
  return row;
}

function parseServerTiming(header) {
  // "decode;dur=0.1, preprocess;dur=0.2, ..., total;dur=3.4" -> {decode: 0.1, ..., total: 3.4}
  const stages = {};
  for (const metric of (header || "").split(",")) {
    const [name, ...params] = metric.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && dur) stages[name] = parseFloat(dur.slice(4));
  }
  return stages;
}

const percent = (p) => (p < 0.001 ? "<0.1%" : `${(p * 100).toFixed(1)}%`);
const ms = (x) => (x < 10 ? `${x.toFixed(2)} ms` : `${Math.round(x)} ms`);
const providerName = (p) => (p ? p.replace(/ExecutionProvider$/, "") : "unknown");

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// --- the model card -----------------------------------------------------------------------------

async function loadModelCard() {
  let response;
  let card;
  try {
    response = await fetch("model", { headers: withKey() });
    card = await response.json().catch(() => null);
  } catch (err) {
    ui.modelStatus.textContent = `Could not reach the service (${err.message}); retrying…`;
    setTimeout(loadModelCard, 2000);
    return;
  }
  if (!response.ok) {
    const answered = `The service answered ${response.status}: ${detailOf(card, response)}`;
    ui.modelStatus.hidden = false;
    ui.modelCard.hidden = true;
    if (response.status === 401) {
      ui.modelStatus.textContent = `${answered}. Enter an API key above.`;
      askForKey();
    } else if (response.status >= 500) {
      // 503 while the model loads: say so, and ask again.
      ui.modelStatus.textContent = `${answered}; retrying…`;
      setTimeout(loadModelCard, 2000);
    } else {
      ui.modelStatus.textContent = answered;
    }
    return;
  }
  labels = card.labels;
  const [height, width] = card.preprocessing.input_size;
  const shown = card.labels.length > 20 ? [...card.labels.slice(0, 20), "…"] : card.labels;
  $("card-name").textContent = card.name;
  $("card-arch").textContent = card.arch || "not recorded";
  $("card-labels").textContent = `${shown.join(", ")} (${card.labels.length} classes)`;
  $("card-input").textContent = `${width}×${height}, colour mode ${card.preprocessing.colour_mode}`;
  $("card-accuracy").textContent = card.val_accuracy == null ? "not recorded" : `${(card.val_accuracy * 100).toFixed(2)}%`;
  $("card-provider").textContent = `${providerName(card.provider)} (${card.provider})`;
  $("card-version").textContent = card.version;
  ui.modelStatus.hidden = true;
  ui.modelCard.hidden = false;
  ui.keyForm.hidden = true;
}

// --- an API key, where the service asks for one -------------------------------------------------

function askForKey() {
  if (!ui.keyForm.hidden) return;
  ui.keyForm.hidden = false;
  ui.key.focus();
}

ui.keyForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  apiKey = ui.key.value.trim();
  await loadModelCard();
  if (lastInput) classify(lastInput.body, lastInput.type, lastInput.name);
});

// --- choosing, dropping, pasting ----------------------------------------------------------------

ui.file.addEventListener("change", () => classifyFile(ui.file.files[0]));

// Drops land anywhere on the page (a near miss must not make the browser open the file instead).
window.addEventListener("dragover", (e) => {
  e.preventDefault();
  ui.dropZone.classList.add("dragging");
});
window.addEventListener("dragleave", (e) => {
  if (e.relatedTarget === null) ui.dropZone.classList.remove("dragging");
});
window.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.dropZone.classList.remove("dragging");
  classifyFile(e.dataTransfer.files[0]);
});

document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.kind === "file");
  if (!item) return;
  e.preventDefault();
  classifyFile(item.getAsFile());
});

ui.topK.addEventListener("change", () => {
  if (lastInput) classify(lastInput.body, lastInput.type, lastInput.name);
});

// --- drawing ------------------------------------------------------------------------------------

const pen = ui.canvas.getContext("2d");
let drawing = false;
let last = null;

function clearCanvas() {
  pen.fillStyle = "#000";
  pen.fillRect(0, 0, ui.canvas.width, ui.canvas.height);
  pen.strokeStyle = "#fff";
  pen.fillStyle = "#fff";
  pen.lineWidth = ui.canvas.width / 10; // about the stroke of the training digits at 8x8
  pen.lineCap = "round";
  pen.lineJoin = "round";
}

function canvasPoint(e) {
  // Pointer position in canvas pixels: the canvas is scaled by CSS to fit narrow screens.
  const box = ui.canvas.getBoundingClientRect();
  return {
    x: ((e.clientX - box.left) * ui.canvas.width) / box.width,
    y: ((e.clientY - box.top) * ui.canvas.height) / box.height,
  };
}

ui.canvas.addEventListener("pointerdown", (e) => {
  if (e.pointerType === "mouse" && e.button !== 0) return;
  e.preventDefault();
  ui.canvas.setPointerCapture(e.pointerId);
  drawing = true;
  last = canvasPoint(e);
  pen.beginPath();
  pen.arc(last.x, last.y, pen.lineWidth / 2, 0, 2 * Math.PI);
  pen.fill();
});

ui.canvas.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
  pen.beginPath();
  pen.moveTo(last.x, last.y);
  for (const event of events.length ? events : [e]) {
    last = canvasPoint(event);
    pen.lineTo(last.x, last.y);
  }
  pen.stroke();
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  ui.canvas.toBlob((png) => classify(png, "image/png", "Your drawing"), "image/png");
}

ui.canvas.addEventListener("pointerup", endStroke);
ui.canvas.addEventListener("pointercancel", endStroke);

ui.clear.addEventListener("click", clearCanvas);

clearCanvas();
loadModelCard();

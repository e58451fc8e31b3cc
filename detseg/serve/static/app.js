// The detseg page: pick a model, send an image (and a plate for BGMv2), show the picture.
// Plain script, no build step; it talks only to the JSON/PNG API of this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], image: null, plate: null, camera: null, cameraPlate: null, live: false };

function current() {
  return state.models.find((m) => m.name === $("model").value);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function refreshControls() {
  const model = current();
  if (!model) return;
  const detector = model.task === "detection" || model.task === "instance";
  $("task").textContent = `${model.task} model` + (model.weights === "random" ? " (random weights)" : "");
  $("plate-row").hidden = !model.needs_plate;
  $("score-row").hidden = !detector;
  $("webcam").hidden = !(model.needs_plate && navigator.mediaDevices);
  $("run").disabled = !state.image || (model.needs_plate && !state.plate);
}

async function loadModels() {
  try {
    const reply = await fetch("/v1/models");
    state.models = (await reply.json()).models;
  } catch (err) {
    showError(`cannot list the models: ${err}`);
    return;
  }
  for (const m of state.models) $("model").add(new Option(`${m.name} (${m.task})`, m.name));
  refreshControls();
}

async function predict(image, plate) {
  const model = current();
  const body = new FormData();
  body.append("image", image, image.name || "image.png");
  if (model.needs_plate && plate) body.append("bgr", plate, plate.name || "plate.png");
  const query = model.task === "detection" || model.task === "instance"
    ? `?score_threshold=${encodeURIComponent($("score").value)}` : "";
  const reply = await fetch(`/v1/predict/${encodeURIComponent(model.name)}${query}`,
                            { method: "POST", body, headers: { Accept: "image/png" } });
  if (!reply.ok) {
    let message = `${reply.status} ${reply.statusText}`;
    try { message = (await reply.json()).error.message; } catch (_) { /* not our JSON */ }
    throw new Error(message);
  }
  return reply.blob();
}

function showPicture(blob) {
  const old = $("result").src;
  const url = URL.createObjectURL(blob);
  $("result").src = url;
  $("download").href = url;
  $("download").download = `${current().name}.png`;
  $("figure").hidden = false;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

async function run() {
  showError("");
  $("run").disabled = true;
  $("status").textContent = "running...";
  const start = performance.now();
  try {
    showPicture(await predict(state.image, state.plate));
    $("status").textContent = `done in ${Math.round(performance.now() - start)} ms`;
  } catch (err) {
    $("status").textContent = "";
    $("figure").hidden = true;  // no stale picture beside the error
    showError(err.message);
  } finally {
    refreshControls();
  }
}

function pick(kind, file) {
  state[kind] = file || null;
  if (kind === "image") $("image-name").textContent = file ? file.name : "";
  refreshControls();
  if (kind === "image" && file && !$("run").disabled) run();
}

function wireDrop(zone, input, kind) {
  input.addEventListener("change", () => pick(kind, input.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    pick(kind, e.dataTransfer.files[0]);
  });
}

// Webcam mode (BGMv2): capture the empty scene as the plate, then matte frame after frame,
// one request at a time, so the server's queue never fills.
function frameBlob() {
  const video = $("camera");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function startCamera() {
  showError("");
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    showError(`no camera: ${err.message}`);
    return;
  }
  $("camera").srcObject = state.camera;
  $("camera").hidden = false;
  $("capture-plate").hidden = false;
  $("stop").hidden = false;
  $("status").textContent = "step out of the picture, then capture the plate";
}

async function capturePlate() {
  state.cameraPlate = await frameBlob();
  $("status").textContent = "plate captured: matting live";
  if (!state.live) liveLoop();
}

async function liveLoop() {
  state.live = true;
  while (state.live && state.camera) {
    try {
      showPicture(await predict(await frameBlob(), state.cameraPlate));
    } catch (err) {
      showError(err.message);
      break;
    }
  }
  state.live = false;
}

function stopCamera() {
  state.live = false;
  if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
  state.camera = null;
  $("camera").hidden = true;
  $("capture-plate").hidden = true;
  $("stop").hidden = true;
  $("status").textContent = "";
}

wireDrop($("drop"), $("image"), "image");
wireDrop($("plate-row"), $("plate"), "plate");
$("model").addEventListener("change", () => { stopCamera(); refreshControls(); });
$("run").addEventListener("click", run);
$("webcam").addEventListener("click", startCamera);
$("capture-plate").addEventListener("click", capturePlate);
$("stop").addEventListener("click", stopCamera);
loadModels();

// pn2v-live viewer: raw and denoised frames side by side, pushed live by server-sent events.
// The server renders 8-bit images at the size we ask for; we only ask for the newest wanted
// frame once the previous one has loaded, so a fast acquisition never queues up requests.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  acquisitions: new Map(), // name -> summary from the server
  selected: null,
  t: 0,
  c: 0,
  z: 0,
  follow: true,
  zoom: 1,
  panX: 0,
  panY: 0,
  modelVersion: undefined, // of the last status message
};
let rendering = false;
let renderAgain = false;

// ---- live updates -------------------------------------------------------------------------

const RETRY_REFUSED_MS = 10000; // after the server refused the stream (busy: 503, no token: 401)

function connect() {
  const events = new EventSource("/api/events");
  events.onopen = () => setConnection("live", "live");
  events.onerror = () => {
    if (events.readyState !== EventSource.CLOSED) {
      setConnection("lost", "reconnecting…"); // the browser retries by itself
      return;
    }
    // Refused (e.g. the viewer's limit of live views is reached): the browser gives up, so
    // try again later ourselves.
    setConnection("lost", "server busy, retrying…");
    setTimeout(connect, RETRY_REFUSED_MS);
  };
  events.addEventListener("acquisitions", (e) => updateAcquisitions(JSON.parse(e.data)));
  events.addEventListener("status", (e) => updateStatus(JSON.parse(e.data)));
}

function setConnection(cls, text) {
  const badge = $("connection");
  badge.className = "badge " + cls;
  badge.textContent = text;
}

function updateAcquisitions(list) {
  const previous = state.selected ? state.acquisitions.get(state.selected) : null;
  state.acquisitions = new Map(list.map((a) => [a.name, a]));
  drawAcquisitionTable();
  if (!state.selected && list.length) selectAcquisition(list[list.length - 1].name);
  const current = state.selected ? state.acquisitions.get(state.selected) : null;
  if (current && JSON.stringify(current) !== JSON.stringify(previous)) onSelectedChanged(current);
}

function drawAcquisitionTable() {
  const body = document.querySelector("#acquisitions tbody");
  body.replaceChildren();
  for (const a of state.acquisitions.values()) {
    const row = body.insertRow();
    row.dataset.name = a.name;
    row.className = a.name === state.selected ? "selected" : "";
    for (const text of [a.name, a.frames, a.denoised, a.closed ? "closed" : "acquiring"]) {
      row.insertCell().textContent = text;
    }
    row.onclick = () => selectAcquisition(a.name);
  }
  $("no-acquisitions").hidden = state.acquisitions.size > 0;
}

function selectAcquisition(name) {
  state.selected = name;
  state.denoisedT = undefined;
  for (const panel of ["raw", "denoised"]) showImage(panel, "", "");
  state.follow = true;
  $("follow").checked = true;
  resetView();
  drawAcquisitionTable();
  fillSelect("c", state.acquisitions.get(name).sizes.c);
  fillSelect("z", state.acquisitions.get(name).sizes.z);
  onSelectedChanged(state.acquisitions.get(name));
}

function fillSelect(axis, size) {
  const select = $(axis + "-select");
  select.replaceChildren(...Array.from({ length: size }, (_, i) => new Option(i, i)));
  state[axis] = 0;
  $(axis + "-control").hidden = size <= 1;
}

function onSelectedChanged(acquisition) {
  // Fetch images only when the shown frame changes or still waits for its denoised twin:
  // a scrubbed-back view stays put (and costs nothing) while new frames arrive.
  const slider = $("t-slider");
  slider.max = Math.max(0, acquisition.frames - 1);
  const t = state.follow ? Math.max(0, acquisition.frames - 1) : state.t;
  const stale = t !== state.t || state.denoisedT !== t;
  state.t = t;
  slider.value = t;
  $("lag").textContent = acquisition.lag;
  if (stale) requestRender();
}

function updateStatus(status) {
  // A newly promoted model re-denoises frames in the background: show the newest rendering.
  if (state.modelVersion !== undefined && status.model_version !== state.modelVersion) {
    requestRender();
  }
  if (state.waitingForModel !== status.waiting_for_model) requestRender();
  state.modelVersion = status.model_version;
  state.waitingForModel = status.waiting_for_model;
  $("model-version").textContent = status.model_version ?? "none yet";
  $("model-gain").textContent = gainLabel(status);
  $("model-source").textContent = status.model_source ? `(${status.model_source})` : "";
  $("model-context").textContent = status.model_context ? `context ${status.model_context}` : "";
  $("backlog").textContent = status.backlog ?? "–";
  $("trainer-state").textContent =
    { idle: "idle", training: "training", waiting: "waiting for inference" }[status.trainer_state]
    ?? "–";
  drawLossPlot(status.loss_history || []);
  showDevice(status.device);
}

function showDevice(device) {
  // "inference on cuda:0 (NVIDIA H200), bfloat16"; training and torch build on hover, and a
  // red badge when an NVIDIA GPU is present that this torch cannot use (the fix on hover).
  $("device-info").hidden = !device?.inference;
  if (!device?.inference) return;
  $("device").textContent = device.inference;
  $("device-info").title = `training on ${device.training}; ${device.torch}`;
  $("device-warning").hidden = !device.warning;
  $("device-warning").title = device.warning ?? "";
}

// ---- rendering ----------------------------------------------------------------------------

function requestRender() {
  if (rendering) {
    renderAgain = true;
    return;
  }
  rendering = true;
  render().finally(() => {
    rendering = false;
    if (renderAgain) {
      renderAgain = false;
      requestRender();
    }
  });
}

async function render() {
  const acquisition = state.acquisitions.get(state.selected);
  if (!acquisition || acquisition.frames === 0) return;
  const t = state.t;
  const base = `/api/acquisitions/${encodeURIComponent(acquisition.name)}`;
  const where = `c=${state.c}&z=${state.z}`;
  let lo, hi;
  if (document.querySelector("input[name=contrast]:checked").value === "manual") {
    lo = parseFloat($("c-min").value);
    hi = parseFloat($("c-max").value);
  }
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) {
    const limits = await fetchJson(
      `${base}/limits?t=${t}&${where}&low=${$("p-low").value}&high=${$("p-high").value}`);
    if (!limits) return;
    [lo, hi] = [limits.lo, limits.hi];
    $("c-min").placeholder = lo.toPrecision(4);
    $("c-max").placeholder = hi.toPrecision(4);
  }
  $("contrast-used").textContent = `[${lo.toPrecision(4)}, ${hi.toPrecision(4)}] ADU`;
  const query = `${where}&lo=${lo}&hi=${hi}&max=${wantedSize()}`;
  const [raw, denoised] = await Promise.all([
    fetchImage(`${base}/raw/${t}?${query}`),
    fetchImage(`${base}/denoised/${t}?${query}`),
  ]);
  if (raw) showImage("raw", raw.url, `t = ${t}`);
  const missing = $("denoised-missing");
  if (denoised) {
    const made = `model v${denoised.version}, ${windowLabel(denoised.window)}`;
    showImage("denoised", denoised.url, `t = ${t}, ${made}`);
    state.denoisedT = t;
  } else if (state.waitingForModel && raw) {
    // No model is measurably better than raw yet: show raw rather than a worse "denoised".
    showImage("denoised", raw.url, `t = ${t}, raw while learning`);
    missing.textContent = "learning: no model beats raw yet";
  } else {
    $("denoised-caption").textContent = `t = ${t}`;
    missing.textContent = state.denoisedT === undefined
      ? "not denoised yet"
      : `not denoised yet (showing t = ${state.denoisedT})`;
  }
  missing.hidden = Boolean(denoised);
  $("denoised-image").classList.toggle("stale", !denoised);
  $("frame-counter").textContent = `t ${t} / ${acquisition.frames - 1}`;
  $("frame-counter").dataset.t = t;
}

function wantedSize() {
  // Pixels the viewport shows at the current zoom, rounded up to a power of two.
  const box = $("raw-viewport").getBoundingClientRect();
  const pixels = Math.max(box.width, box.height) * (window.devicePixelRatio || 1) * state.zoom;
  return 2 ** Math.ceil(Math.log2(Math.max(256, pixels)));
}

async function fetchJson(url) {
  const response = await fetch(url);
  return response.ok ? response.json() : null;
}

async function fetchImage(url) {
  const response = await fetch(url);
  if (!response.ok) return null;
  const blob = await response.blob();
  return {
    url: URL.createObjectURL(blob),
    version: response.headers.get("X-Model-Version"),
    window: response.headers.get("X-Context-Window"),
  };
}

function gainLabel(status) {
  // The promoted model's ground-truth-free PSNR gain over raw, measured on held-back frames.
  const gain = status.model_estimated_gain_db;
  if (gain === null || gain === undefined) return "";
  const spread = status.model_estimated_gain_uncertainty_db;
  return `≈ ${gain >= 0 ? "+" : ""}${gain.toFixed(1)} ± ${(spread ?? 0).toFixed(1)} dB over raw`;
}

function windowLabel(window) {
  // "before:after" frames the model saw around t: a live twin sees none after t.
  const [before, after] = (window || "0:0").split(":").map(Number);
  if (before === 0 && after === 0) return "single frame";
  const frames = `frames t−${before}…t${after ? "+" + after : ""}`;
  return after ? `refined, ${frames}` : `live, ${frames}`;
}

function showImage(panel, url, caption) {
  // url "" clears the panel.
  const img = $(panel + "-image");
  const old = img.src;
  if (url) img.src = url;
  else img.removeAttribute("src");
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  $(panel + "-caption").textContent = caption;
}

// ---- zoom and pan, shared by both panels ---------------------------------------------------

function applyView() {
  for (const panel of ["raw", "denoised"]) {
    const img = $(panel + "-image");
    img.style.transform = `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
    img.classList.toggle("pixelated", state.zoom > 2);
  }
}

function resetView() {
  [state.zoom, state.panX, state.panY] = [1, 0, 0];
  applyView();
}

function setupZoomPan(viewport) {
  viewport.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = viewport.getBoundingClientRect();
    const [x, y] = [e.clientX - box.left, e.clientY - box.top];
    const zoom = Math.min(64, Math.max(1, state.zoom * Math.exp(-e.deltaY * 0.002)));
    state.panX = x - (x - state.panX) * (zoom / state.zoom);
    state.panY = y - (y - state.panY) * (zoom / state.zoom);
    const sharper = wantedSizeFor(zoom) > wantedSizeFor(state.zoom);
    state.zoom = zoom;
    applyView();
    if (sharper) requestRender();
  }, { passive: false });
  let drag = null;
  viewport.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX - state.panX, y: e.clientY - state.panY };
    viewport.setPointerCapture(e.pointerId);
  });
  viewport.addEventListener("pointermove", (e) => {
    if (!drag) return;
    [state.panX, state.panY] = [e.clientX - drag.x, e.clientY - drag.y];
    applyView();
  });
  viewport.addEventListener("pointerup", () => { drag = null; });
  viewport.addEventListener("dblclick", resetView);
}

function wantedSizeFor(zoom) {
  const saved = state.zoom;
  state.zoom = zoom;
  const size = wantedSize();
  state.zoom = saved;
  return size;
}

// ---- loss plot ----------------------------------------------------------------------------

function drawLossPlot(history) {
  const canvas = $("loss-plot");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const series = [
    ["training_loss", "#4ea1ff"],
    ["validation_loss", "#ffa94d"],
  ];
  const values = history.flatMap((h) => series.map(([key]) => h[key])).filter(Number.isFinite);
  g.fillStyle = "#889";
  g.font = "11px system-ui";
  if (!values.length) {
    g.fillText("no training round yet", 10, canvas.height / 2);
    return;
  }
  const [min, max] = [Math.min(...values), Math.max(...values)];
  const span = max - min || 1;
  const pad = 28;
  const x = (i) => pad + (i / Math.max(1, history.length - 1)) * (canvas.width - pad - 6);
  const y = (v) => 6 + (1 - (v - min) / span) * (canvas.height - 24);
  g.fillText(max.toPrecision(3), 0, 12);
  g.fillText(min.toPrecision(3), 0, canvas.height - 18);
  g.fillText(`round ${history[history.length - 1].round}`, canvas.width - 60, canvas.height - 4);
  for (const [key, color] of series) {
    g.strokeStyle = color;
    g.lineWidth = 1.5;
    g.beginPath();
    history.forEach((h, i) => {
      if (!Number.isFinite(h[key])) return;
      if (i === 0) g.moveTo(x(i), y(h[key]));
      else g.lineTo(x(i), y(h[key]));
      g.fillStyle = color;
      g.fillRect(x(i) - 1.5, y(h[key]) - 1.5, 3, 3);
    });
    g.stroke();
  }
}

// ---- controls -----------------------------------------------------------------------------

function setupControls() {
  $("t-slider").addEventListener("input", (e) => {
    state.t = parseInt(e.target.value, 10);
    const acquisition = state.acquisitions.get(state.selected);
    state.follow = acquisition ? state.t >= acquisition.frames - 1 : true;
    $("follow").checked = state.follow;
    requestRender();
  });
  $("follow").addEventListener("change", (e) => {
    state.follow = e.target.checked;
    const acquisition = state.acquisitions.get(state.selected);
    if (state.follow && acquisition) onSelectedChanged(acquisition);
  });
  for (const axis of ["c", "z"]) {
    $(axis + "-select").addEventListener("change", (e) => {
      state[axis] = parseInt(e.target.value, 10);
      state.denoisedT = undefined;
      requestRender();
    });
  }
  for (const id of ["p-low", "p-high", "c-min", "c-max"]) {
    $(id).addEventListener("change", () => {
      const manual = id.startsWith("c-");
      document.querySelector(`input[name=contrast][value=${manual ? "manual" : "auto"}]`)
        .checked = true;
      requestRender();
    });
  }
  for (const radio of document.querySelectorAll("input[name=contrast]")) {
    radio.addEventListener("change", requestRender);
  }
  $("reset-view").addEventListener("click", resetView);
  for (const panel of ["raw", "denoised"]) setupZoomPan($(panel + "-viewport"));
  window.addEventListener("resize", requestRender);
}

setupControls();
drawLossPlot([]);
connect();

// streamgen live player: protocol v1 (docs/protocol.md) over a websocket; the media goes to player.js (WebCodecs,
// else Media Source Extensions). URL parameters: prompt, steps, seed, token, autoplay=1 (starts the stream by
// itself, muted), player=mse (skip WebCodecs), watch=ID&key=K (a watch link: someone's stream, read-only).
"use strict";

const STAGES = { transformer: "#6ea8ff", cache: "#a98bff", decode: "#4cc38a", encode: "#f0b44c", send: "#f06a6a" };
const DISPLAYED_KEPT = 600; // entries of `player.displayed` kept
const FPS_WINDOW_S = 3; // received fps is averaged over this many seconds

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ui = {
  status: $("status"), video: $("video"), canvas: $("canvas"), overlay: $("overlay"), info: $("info"),
  prompt: $("prompt"), steps: $("steps"), stepsValue: $("steps-value"), file: $("file"),
  start: $("start"), pause: $("pause"), stop: $("stop"),
  transition: $("transition"), transitionValue: $("transition-value"),
  share: $("share"), watchLink: $("watch-link"), viewers: $("viewers"),
  fps: $("stat-fps"), gen: $("stat-gen"), played: $("stat-played"), ahead: $("stat-ahead"),
  latencyTotal: $("latency-total"), latencyBar: $("latency-bar"), legend: $("latency-legend"), message: $("message"),
};

// One connection and at most one session; exposed for tests and the console.
const player = {
  ws: null, state: "connecting", ready: null, header: null,
  media: null, early: [], received: [], chunks: 0, last: null, autoplay: params.get("autoplay") === "1",
  displayed: [], // [performance.now(), frame number] of each frame shown, latest last
  watching: params.has("watch"), // a viewer of someone else's stream
};
window.streamgen = player;

// -- connection ---------------------------------------------------------------------------------------------
function connect() {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (params.has("token")) url.searchParams.set("token", params.get("token"));
  if (player.watching) ["watch", "key"].forEach((name) => url.searchParams.set(name, params.get(name) ?? ""));
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  if (player.watching) ws.onopen = () => setState("idle", "waiting"); // no `ready`: `started` comes next
  ws.onmessage = (e) => (typeof e.data === "string" ? onEvent(JSON.parse(e.data)) : onMedia(e.data));
  ws.onclose = () => {
    setState("disconnected");
    setTimeout(connect, 2000);
  };
  player.ws = ws;
}

// -- prompt help: the served model's example prompts, and the words of a prompt its tokenizer does not know ------
function offerPrompts(ready) {
  const examples = ready.example_prompts ?? [];
  const box = $("examples");
  box.replaceChildren(...examples.map((text) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = text;
    button.onclick = () => {
      ui.prompt.value = text;
      markUnknownWords();
      ui.prompt.focus();
    };
    return button;
  }));
  box.hidden = examples.length === 0;
  if (examples.length) ui.prompt.placeholder = examples[0];
  markUnknownWords();
}

function markUnknownWords() {
  const known = player.ready?.vocabulary; // null: the tokenizer spells any word
  const note = $("unknown-words");
  const unknown = known ? [...new Set(ui.prompt.value.toLowerCase().match(/\w+/g) ?? [])].filter((w) => !known.includes(w)) : [];
  note.textContent = unknown.length ? `This model does not know: ${unknown.join(", ")}` : "";
  note.hidden = unknown.length === 0;
}

function send(message) {
  if (player.ws?.readyState === WebSocket.OPEN) player.ws.send(JSON.stringify(message));
}

function onEvent(msg) {
  switch (msg.type) {
    case "ready":
      player.ready = msg;
      ui.steps.min = 0; // the slider's first position is "auto": the most steps that hold the stream's fps
      ui.steps.max = Math.min(msg.max_steps, 16);
      ui.steps.value = params.get("steps") === "auto" ? 0 : params.get("steps") ?? msg.steps;
      ui.stepsValue.textContent = stepsChoice();
      offerPrompts(msg);
      setState("idle", "ready");
      if (player.autoplay && ui.prompt.value.trim()) {
        player.autoplay = false;
        start();
      }
      break;
    case "queued":
      setState("queued", `queued #${msg.position}`);
      ui.overlay.textContent = `Every slot is busy: you are number ${msg.position} in line`;
      break;
    case "started":
      openMedia(msg);
      ui.overlay.hidden = true;
      ui.info.textContent = [msg.mode, `${msg.width}×${msg.height}`, `${msg.fps} fps`, msg.codec, `seed ${msg.seed}`]
        .join(" · ");
      setState("live", player.watching ? "watching" : "live");
      ui.share.hidden = !msg.watch_url;
      if (msg.watch_url) ui.watchLink.value = new URL(msg.watch_url, location.href).href;
      break;
    case "viewers":
      ui.viewers.textContent = msg.count;
      break;
    case "segment":
      player.header = msg; // the binary message that follows is its data
      break;
    case "chunk":
      player.chunks += 1;
      player.last = msg;
      showChunk(msg);
      break;
    case "paused":
    case "resumed":
      setState(msg.type === "paused" ? "paused" : "live");
      break;
    case "error":
      showMessage(`${msg.code}: ${msg.message}`);
      if (player.state === "starting") setState("idle", "ready"); // the start was refused
      break;
    case "stopped":
      setState("idle", msg.reason === "client" ? "stopped" : `stopped (${msg.reason})`);
      ui.overlay.textContent = player.watching ? "The stream has ended" : "Write a prompt and press Start";
      ui.overlay.hidden = false;
      ui.share.hidden = true;
      break;
  }
}

function onMedia(data) {
  const header = player.header;
  player.header = null;
  if (!header) return;
  if (header.kind !== "init") player.received.push([performance.now(), header.frames]);
  if (player.media) player.media.append(data, header);
  else player.early.push([data, header]); // while the player is being chosen
}

// -- commands -----------------------------------------------------------------------------------------------
async function start() {
  const prompt = ui.prompt.value.trim();
  if (!prompt) return showMessage("Write a prompt first.");
  const message = { type: "start", prompt, steps: stepsChoice(), realtime: true };
  if (params.has("seed")) message.seed = Number(params.get("seed"));
  const file = ui.file.files[0];
  let upload = null;
  if (file) {
    if (file.size === 0) return showMessage("That file is empty.");
    if (file.size > player.ready.limits.max_upload_bytes) return showMessage("That file is too large to upload.");
    message.mode = file.type.startsWith("image/") ? "i2v" : "v2v";
    upload = await file.arrayBuffer();
    message.upload_bytes = upload.byteLength;
  }
  hideMessage();
  send(message);
  if (upload) player.ws.send(upload);
  setState("starting");
}

ui.start.onclick = start;
ui.stop.onclick = () => send({ type: "stop" });
ui.pause.onclick = () => send({ type: player.state === "paused" ? "resume" : "pause" });
const stepsChoice = () => Number(ui.steps.value) || "auto";
ui.steps.oninput = () => (ui.stepsValue.textContent = stepsChoice());
ui.transition.oninput = () => (ui.transitionValue.textContent = ui.transition.value);
ui.steps.onchange = () => inSession() && send({ type: "steps", steps: stepsChoice() });
ui.prompt.oninput = markUnknownWords;
ui.prompt.onkeydown = (e) => {
  if (e.key !== "Enter" || e.shiftKey) return;
  e.preventDefault();
  const prompt = ui.prompt.value.trim();
  const transition = Number(ui.transition.value);
  if (inSession() && prompt) send({ type: "prompt", prompt, ...(transition && { transition }) });
  else if (player.state === "idle") start();
};

// -- media ----------------------------------------------------------------------------------------------------
async function openMedia({ codec, fps }) {
  player.media?.close();
  Object.assign(player, { media: null, early: [], received: [], chunks: 0, displayed: [] });
  const onDisplayed = (frame) => {
    player.displayed.push([performance.now(), frame]);
    if (player.displayed.length > DISPLAYED_KEPT) player.displayed.splice(0, DISPLAYED_KEPT / 2);
  };
  try {
    player.media = await createPlayer({
      canvas: ui.canvas, video: ui.video, codec, fps, prefer: params.get("player"), onDisplayed, onError: showMessage,
    });
  } catch (e) {
    return showMessage(e.message);
  }
  player.early.splice(0).forEach(([data, header]) => player.media.append(data, header));
}

// -- readouts -------------------------------------------------------------------------------------------------
function showChunk(msg) {
  const latency = msg.latency_ms;
  const steps = `${msg.steps} step${msg.steps > 1 ? "s" : ""}`;
  const blend = msg.transition ? ` · ${Math.round(100 * msg.transition.weight)}% new prompt` : "";
  ui.latencyTotal.textContent = `${latency.total.toFixed(0)} ms · ${steps}${blend}`;
  ui.latencyBar.replaceChildren(...Object.entries(STAGES).map(([stage, color]) => {
    const part = document.createElement("span");
    part.style.cssText = `width:${(100 * latency[stage]) / latency.total}%;background:${color}`;
    part.title = stage;
    return part;
  }));
  ui.legend.replaceChildren(...Object.entries(STAGES).map(([stage, color]) => {
    const item = document.createElement("li");
    item.innerHTML = `<i style="background:${color}"></i>${stage}<b>${latency[stage].toFixed(1)} ms</b>`;
    return item;
  }));
  const busy = latency.transformer + latency.cache + latency.decode + latency.encode;
  ui.gen.textContent = busy > 0 ? ((1000 * msg.frames) / busy).toFixed(1) : "–";
}

setInterval(() => {
  const now = performance.now();
  player.received = player.received.filter(([time]) => now - time < FPS_WINDOW_S * 1000);
  const frames = player.received.reduce((sum, [, count]) => sum + count, 0);
  ui.fps.textContent = player.state === "live" ? (frames / FPS_WINDOW_S).toFixed(1) : "–";
  ui.played.textContent = player.media?.played ?? "–";
  ui.ahead.textContent = player.media?.ahead.toFixed(1) ?? "–";
}, 500);

// -- state ----------------------------------------------------------------------------------------------------
function inSession() {
  return ["starting", "queued", "live", "paused"].includes(player.state);
}

function setState(state, label = state) {
  player.state = state;
  ui.status.dataset.state = state;
  ui.status.textContent = label;
  const connected = !["connecting", "disconnected"].includes(state);
  ui.start.disabled = !connected || inSession();
  ui.stop.disabled = !inSession();
  ui.pause.disabled = !["live", "paused"].includes(state);
  ui.pause.textContent = state === "paused" ? "Resume" : "Pause";
}

function showMessage(text) {
  ui.message.textContent = text;
  ui.message.hidden = false;
}

function hideMessage() {
  ui.message.hidden = true;
}

ui.prompt.value = params.get("prompt") ?? "";
ui.video.muted = true; // muted video may autoplay
document.body.dataset.mode = player.watching ? "watch" : "steer";
if (player.watching) ui.overlay.textContent = "Waiting for the stream";
connect();

// The page at GET /: the deployments, a form per modality, and the demo robot. Plain browser JavaScript:
// no build step, nothing fetched from outside this server.
"use strict";

const $ = (selector) => document.querySelector(selector);

// ------------------------------------------------------------------------------------------ requests

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const key = $("#api-key").value.trim();
  if (key) h["authorization"] = `Bearer ${key}`;
  return h;
}

// One call to this server: the parsed JSON reply, or an Error carrying the server's error message.
async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = text;
  try { data = JSON.parse(text); } catch (e) { /* not JSON: keep the text */ }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `${response.status} ${text}`;
    throw new Error(message);
  }
  return data;
}

function show(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

// Runs a form's action with its button disabled; an error is shown in `out`.
function onSubmit(form, out, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await action(new FormData(form));
    } catch (error) {
      show(out, String(error.message || error), true);
    } finally {
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------------------------------ deployments

let deployments = [];

function ioSummary(d) {
  const io = d.io || {};
  if (d.modality === "action") {
    return `cameras ${io.cameras}; proprioception ${(io.proprioception || []).map((p) => p.field)}; ` +
      `actions ${(io.actions || []).map((a) => a.field)}; horizon ${io.action_horizon}`;
  }
  return Object.entries(io).slice(0, 4).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join("; ");
}

function fillTable() {
  const body = $("#deployments tbody");
  body.replaceChildren(...deployments.map((d) => {
    const row = document.createElement("tr");
    row.dataset.name = d.name;
    const status = d.status + (d.stage ? ` (${d.stage})` : "") + (d.error ? `: ${d.error}` : "");
    for (const [text, cls] of [[d.name], [d.type], [status, `status-${d.status}`], [d.device || ""],
                               [ioSummary(d), "io"]]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (cls) cell.className = cls;
      row.append(cell);
    }
    return row;
  }));
}

// Each form lists the deployments of its modality it can drive (chat: the text and caption deployments with a chat
// template; text: those that take text prompts, not only token ids).
function fillForms() {
  for (const section of document.querySelectorAll("section.try")) {
    const chatting = section.dataset.modality === "chat";
    // (one not ready yet is listed, disabled: its io is not known until it has loaded)
    const able = (d, can) => d.status !== "ready" || can(d.io || {});
    const usable = deployments.filter((d) => chatting
      ? ["text", "caption"].includes(d.modality) && able(d, (io) => io.chat)
      : d.modality === section.dataset.modality &&
        (d.modality !== "text" || able(d, (io) => (io.accepts || []).includes("prompt"))));
    section.hidden = usable.length === 0;
    const select = section.querySelector("select[name=model]");
    const previous = select.value;
    select.replaceChildren(...usable.map((d) => {
      const option = new Option(`${d.name} (${d.status})`, d.name);
      option.disabled = d.status !== "ready";
      return option;
    }));
    if (usable.some((d) => d.name === previous)) select.value = previous;
    else {
      const ready = usable.find((d) => d.status === "ready");
      if (ready) select.value = ready.name;
    }
  }
}

let refreshTimer = null;  // one poll while deployments load, however often refresh() is called

async function refresh() {
  clearTimeout(refreshTimer);
  try {
    deployments = (await api("GET", "models")).deployments;
    fillTable();
    fillForms();
    fitImagePrompt();
    const loading = deployments.filter((d) => d.status === "loading").length;
    show($("#status-line"), loading ? `${loading} deployment(s) loading…` : "");
    document.body.dataset.loaded = "true";
    if (loading) refreshTimer = setTimeout(refresh, 2000);
  } catch (error) {  // unreachable, or a key is needed: nothing shown stands (no stale "ready" rows and forms)
    deployments = [];
    fillTable();
    fillForms();
    show($("#status-line"), String(error.message || error), true);
  }
}

// The image form shows its prompt only for a model that takes one.
function fitImagePrompt() {
  const chosen = deployments.find((d) => d.name === $("#image-form select[name=model]").value);
  $("#image-form input[name=prompt]").hidden = Boolean(chosen) && !(chosen.io || {}).text;
}
$("#image-form select[name=model]").addEventListener("change", fitImagePrompt);

// The deployment chosen in a form (an Error when there is none: nothing loaded, or no key given).
function deployment(name) {
  const d = deployments.find((x) => x.name === name);
  if (!d) throw new Error("no deployment is chosen: none is ready here (a server with API keys needs one above)");
  return d;
}

// ------------------------------------------------------------------------------------------ the forms

onSubmit($("#text-form"), $("#text-out"), async (form) => {
  const d = deployment(form.get("model"));
  show($("#text-out"), "…");
  // (no length: the server's default, within its cap VLA_MAX_NEW_TOKENS)
  const reply = await api("POST", `predict/${d.type}`, {model: d.name, prompt: form.get("prompt")});
  show($("#text-out"), form.get("prompt") + reply.completions[0].text);
});

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

onSubmit($("#caption-form"), $("#caption-out"), async (form) => {
  const d = deployment(form.get("model"));
  const file = form.get("image");
  if (!file || !file.size) throw new Error("choose an image first");
  const image = await readAsDataUrl(file);
  $("#caption-preview").src = image;
  $("#caption-preview").hidden = false;
  show($("#caption-out"), "…");
  const reply = await api("POST", `predict/${d.type}`, {model: d.name, image, temperature: 0});
  show($("#caption-out"), reply.captions[0].text);
});

onSubmit($("#image-form"), $("#image-out"), async (form) => {
  const d = deployment(form.get("model"));
  show($("#image-out"), "…");
  // A prompt only for a model that takes one (an unconditional model refuses any); one image, the default.
  const prompt = (d.io || {}).text ? form.get("prompt").trim() : "";
  const reply = await api("POST", `predict/${d.type}`, prompt ? {model: d.name, prompt} : {model: d.name});
  $("#image-out").replaceChildren(...reply.images.map((im) => {
    const img = new Image();
    img.src = `data:image/png;base64,${im.data}`;
    img.title = `seed ${im.seed}`;
    return img;
  }));
});

let chat = [];
let answered = 0;
function drawChat() {
  $("#chat-log").replaceChildren(...chat.map((m) => {
    const line = document.createElement("div");
    line.className = `chat-${m.role}`;
    line.textContent = `${m.role}: ${m.content}`;
    return line;
  }));
}
$("#chat-clear").addEventListener("click", () => { chat = []; drawChat(); });
onSubmit($("#chat-form"), $("#chat-error"), async (form) => {
  // The turn joins the history once it is answered (a refused one is not sent again); when the history no longer
  // fits the model's context with the reply, the oldest exchanges are left out, as chat apps do.
  // A turn refused even alone leaves the history as it was. (No length: until eos, the server's cap, or the end of
  // the model's context.)
  const turn = {role: "user", content: form.get("message")};
  const model = deployment(form.get("model")).name;
  show($("#chat-error"), "");
  let history = [...chat];
  for (;;) {
    try {
      const reply = await api("POST", "v1/chat/completions", {model, messages: [...history, turn]});
      chat = [...history, turn, {role: "assistant", content: reply.choices[0].message.content}];
      answered += 1;
      break;
    } catch (error) {
      if (!history.length || !/max_seq_len/.test(error.message)) throw error;
      history = history.slice(2);  // the oldest question and its answer
    }
  }
  drawChat();
  $("#chat-log").dataset.answered = String(answered);  // (turns answered since the page opened)
});

// ------------------------------------------------------------------------------------------ the demo robot

// The reach task of vla_foundry/demo/reach_task.py, in the browser: the same world, the same pixels (a pixel
// belongs to a disc when its centre lies within the radius). tests/service/test_web_page.py checks these
// constants against the Python module and the rendered frames against its render().
const REACH = {"image_size": 32, "background": 30, "agent_color": [255, 255, 255],
  "colors": {"red": [230, 40, 40], "blue": [40, 90, 230], "green": [40, 200, 60], "yellow": [230, 210, 40]},
  "target_radius_px": 3.5, "agent_radius_px": 2.0, "max_step": 0.25, "success_radius": 0.3, "episode_steps": 10,
  "target_spots": [[-0.6, -0.6], [-0.6, 0.6], [0.6, -0.6], [0.6, 0.6]], "target_jitter": 0.1, "agent_range": 0.9,
  "min_agent_target_distance": 0.5};

function random(seed) {  // mulberry32: a small seeded generator, so an episode can be replayed
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const f32 = Math.fround;  // the Python task keeps positions in float32

function sampleState(rand) {
  const colors = Object.keys(REACH.colors);
  const color = colors[Math.floor(rand() * colors.length)];
  const spot = REACH.target_spots[Math.floor(rand() * REACH.target_spots.length)];
  const jitter = () => (rand() * 2 - 1) * REACH.target_jitter;
  const target = [f32(spot[0] + jitter()), f32(spot[1] + jitter())];
  let agent;
  do {
    agent = [f32((rand() * 2 - 1) * REACH.agent_range), f32((rand() * 2 - 1) * REACH.agent_range)];
  } while (Math.hypot(agent[0] - target[0], agent[1] - target[1]) < REACH.min_agent_target_distance);
  return {agent, target, goal: color};
}

function render(state) {  // (S, S, 3) uint8, row-major
  const S = REACH.image_size;
  const pixels = new Uint8Array(S * S * 3).fill(REACH.background);
  const disc = (xy, radius, rgb) => {
    const row = (1 - xy[1]) / 2 * S, col = (xy[0] + 1) / 2 * S;
    for (let r = 0; r < S; r++) {
      for (let c = 0; c < S; c++) {
        if ((r + 0.5 - row) ** 2 + (c + 0.5 - col) ** 2 <= radius ** 2) pixels.set(rgb, (r * S + c) * 3);
      }
    }
  };
  disc(state.target, REACH.target_radius_px, REACH.colors[state.goal]);
  disc(state.agent, REACH.agent_radius_px, REACH.agent_color);  // last: the agent stays visible on the target
  return pixels;
}

function step(state, action) {
  const clip = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const delta = action.map((v) => f32(clip(f32(v), -REACH.max_step, REACH.max_step)));
  return {...state, agent: state.agent.map((v, i) => f32(clip(f32(v + delta[i]), -1, 1)))};
}

const succeeded = (s) => Math.hypot(s.agent[0] - s.target[0], s.agent[1] - s.target[1]) < REACH.success_radius;

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function draw(state, trail) {
  const S = REACH.image_size, canvas = $("#robot-canvas"), ctx = canvas.getContext("2d");
  const frame = render(state), rgba = new Uint8ClampedArray(S * S * 4);
  for (let i = 0; i < S * S; i++) { rgba.set(frame.subarray(i * 3, i * 3 + 3), i * 4); rgba[i * 4 + 3] = 255; }
  const small = document.createElement("canvas");
  small.width = small.height = S;
  small.getContext("2d").putImageData(new ImageData(rgba, S, S), 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "rgba(255,255,255,0.5)";
  ctx.beginPath();
  trail.forEach(([x, y], i) => {
    const px = (x + 1) / 2 * canvas.width, py = (1 - y) / 2 * canvas.height;
    if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
  });
  ctx.stroke();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let episodes = 0;

// One episode: the robot sends only the current step (its session on the server holds the history), executes
// n_action_steps of each chunk, and succeeds when it ends on the named target. The record goes to
// window.robotEpisode (start state, every frame sent, every action executed) for anyone who wants to replay it.
async function runEpisode(d) {
  const io = d.io, seed = 1000 + episodes++;
  const camera = io.cameras[0], proprio = io.proprioception[0].field, actionField = io.actions[0].field;
  const sessionId = `page-${seed}-${Math.random().toString(36).slice(2, 10)}`;
  let state = sampleState(random(seed));
  const instruction = `move to the ${state.goal} target`;
  const record = {seed, start: {agent: state.agent, target: state.target, goal: state.goal}, frames: [], actions: []};
  window.robotEpisode = record;
  const trail = [state.agent];
  draw(state, trail);
  show($("#robot-out"), `${instruction}…`);
  let plan = [];
  try {
    for (let t = 0; t < REACH.episode_steps; t++) {
      if (plan.length === 0) {
        const frame = render(state);
        record.frames.push({t, pixels: Array.from(frame)});
        const reply = await api("POST", `predict/${d.type}`, {
          model: d.name, session_id: sessionId, seed: seed * 100 + t,
          observation: {images: {[camera]: {dtype: "|u1", shape: [REACH.image_size, REACH.image_size, 3],
                                            data: base64(frame)}},
                        lowdim: {[proprio]: state.agent}, language_instruction: instruction}});
        const first = reply.first_action_index;
        plan = reply.actions[actionField].slice(first, first + reply.n_action_steps);
      }
      const action = plan.shift();
      record.actions.push(action);
      state = step(state, action);
      trail.push(state.agent);
      draw(state, trail);
      await sleep(60);
    }
  } finally {
    api("DELETE", `sessions/${sessionId}`).catch(() => {});
  }
  const ok = succeeded(state);
  record.final = state.agent;
  record.success = ok;
  show($("#robot-out"), `${instruction}: ${ok ? "reached ✓" : "missed ✗"} after ${REACH.episode_steps} steps`);
  $("#robot-out").dataset.result = ok ? "success" : "failure";
}

onSubmit($("#robot-form"), $("#robot-out"), async (form) => {
  delete $("#robot-out").dataset.result;
  await runEpisode(deployment(form.get("model")));
});

$("#refresh").addEventListener("click", refresh);
$("#api-key").addEventListener("change", refresh);
refresh();

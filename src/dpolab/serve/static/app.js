// dpolab chat page. Vanilla JS, no build step, no CDN.
// Security rule: model output (and anything from the server) is only ever put in the page with
// textContent, never innerHTML, so an answer containing <script> or <img onerror> stays text.
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLING = ["temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty"];
const LABELS = { policy: "DPO model", reference: "Reference" };

// Finished turns: {prompt, answers: {role: text}, preferred: role|null}. Kept only in the page.
const turns = [];
let running = null; // {controller, jobId, cancelRequested}
let modelInfo = null;

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text || "";
  status.dataset.kind = kind || "";
}

function fmt(value) {
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const size = Math.abs(value);
    return size !== 0 && (size < 1e-3 || size >= 1e5) ? value.toExponential(2) : String(Number(value.toPrecision(4)));
  }
  if (value === null || value === undefined || value === "") return "–";
  return String(value);
}

function addRow(dl, key, value) {
  const dt = document.createElement("dt");
  dt.textContent = key;
  const dd = document.createElement("dd");
  dd.textContent = fmt(value);
  dl.append(dt, dd);
}

async function loadModel() {
  let response;
  for (;;) { // 503 while the server is still loading the models: retry
    response = await fetch("/api/model");
    if (response.status !== 503) break;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  modelInfo = await response.json();
  const dl = $("model-info");
  dl.replaceChildren();
  addRow(dl, "Model", modelInfo.model);
  addRow(dl, "Kind", modelInfo.kind);
  addRow(dl, "Base model", modelInfo.base_model);
  addRow(dl, "Reference", modelInfo.reference || "none");
  addRow(dl, "Dataset", modelInfo.dataset);
  // The beta the model was trained with scales its rewards; say so when its records do not tell.
  addRow(dl, "beta", modelInfo.beta === null ? "unknown" : modelInfo.beta);
  if (modelInfo.beta_note) addRow(dl, "Rewards", modelInfo.beta_note);
  const hp = modelInfo.hyperparameters || {};
  // The knobs that explain a DPO run at a glance; the rest is in the run's config.yaml.
  const shown = { loss_type: "Loss", learning_rate: "Learning rate", per_device_train_batch_size: "Batch size",
    num_train_epochs: "Epochs", max_steps: "Max steps", max_train_pairs: "Train pairs (max)" };
  for (const [key, label] of Object.entries(shown)) {
    if (key in hp && !(key === "max_steps" && hp[key] <= 0)) addRow(dl, label, hp[key]);
  }
  const evals = modelInfo.eval || {};
  addRow(dl, "Eval loss", evals.loss);
  addRow(dl, "Reward accuracy", evals["rewards/accuracies"]);
  addRow(dl, "Reward margin", evals["rewards/margins"]);
  addRow(dl, "Context", modelInfo.context_length);
  if (modelInfo.note) addRow(dl, "Note", modelInfo.note);
  for (const name of SAMPLING) {
    const input = $(name), bound = modelInfo.bounds[name];
    Object.assign(input, { min: bound.min, max: bound.max, step: bound.step, value: bound.default });
  }
  $("compare").disabled = !modelInfo.compare;
  document.body.dataset.ready = "true";
}

// Dialogue so far, in the API's {role, content} form: a compared turn continues with the answer
// the person marked better, else with the DPO model's.
function history(upTo) {
  const messages = [];
  for (const turn of turns.slice(0, upTo)) {
    messages.push({ role: "user", content: turn.prompt });
    messages.push({ role: "assistant", content: turn.answers[turn.preferred || "policy"] || "" });
  }
  return messages;
}

function samplingValues() {
  const values = {};
  for (const name of SAMPLING) {
    const input = $(name);
    if (!input.checkValidity() || input.value === "") {
      throw new Error(`${name} must be between ${input.min} and ${input.max}`);
    }
    values[name] = Number(input.value);
  }
  return values;
}

function makeTurn(prompt, roles) {
  const li = document.createElement("li");
  li.className = "turn";
  const user = document.createElement("div");
  user.className = "user-msg";
  user.textContent = prompt;
  const answers = document.createElement("div");
  answers.className = roles.length > 1 ? "answers compare" : "answers";
  const cards = {};
  for (const role of roles) {
    const card = $("answer-template").content.firstElementChild.cloneNode(true);
    card.dataset.role = role;
    card.querySelector(".who").textContent = LABELS[role];
    card.querySelector(".prefer").hidden = true;
    card.querySelector(".regen").hidden = true;
    card.classList.add("streaming");
    answers.append(card);
    cards[role] = card;
  }
  li.append(user, answers);
  $("chat").append(li);
  $("empty").hidden = true;
  return { li, cards };
}

// Parse a fetch() body as Server-Sent Events (EventSource cannot POST a JSON body).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

function setRunning(value) {
  running = value;
  $("send").disabled = !!value;
  $("stop").disabled = !value;
  $("clear").disabled = !!value;
}

function finishCard(card, answer, compare) {
  card.classList.remove("streaming");
  card.querySelector(".answer-text").textContent = answer.text.trim();
  card.querySelector(".model-id").textContent = answer.model;
  const reward = card.querySelector(".reward");
  reward.textContent = answer.reward === null ? "" : `reward ${answer.reward >= 0 ? "+" : ""}${answer.reward.toFixed(3)}`;
  if (answer.reward !== null && modelInfo.beta === null) reward.textContent += " (beta unknown)";
  const labels = { stop: "", length: "max tokens reached", cancelled: "stopped", time_limit: "time limit" };
  card.querySelector(".finish").textContent = labels[answer.finish_reason] || answer.finish_reason;
  card.dataset.finish = answer.finish_reason;
  card.querySelector(".prefer").hidden = !compare;
}

async function send(prompt, compare) {
  let sampling;
  try { sampling = samplingValues(); } catch (error) { setStatus(error.message, "error"); return; }
  const roles = compare ? ["policy", "reference"] : ["policy"];
  const index = turns.length;
  const body = { prompt, history: history(index), compare, stream: true, ...sampling };
  const view = makeTurn(prompt, roles);
  const controller = new AbortController();
  setRunning({ controller, jobId: null });
  setStatus("Generating…", "busy");
  const texts = Object.fromEntries(roles.map((r) => [r, ""]));
  let result = null;
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(`${response.status}: ${error.error.message}`);
    }
    for await (const { event, data } of sseEvents(response)) {
      if (event === "start") {
        running.jobId = data.id;
        const notes = [];
        if (data.truncated_turns) notes.push(`${data.truncated_turns} oldest message(s) dropped to fit the context`);
        if (data.max_new_tokens_capped) notes.push(`max new tokens capped at ${data.max_new_tokens}`);
        if (running.cancelRequested) cancelJob(data.id);
        setStatus(["Generating…", ...notes].join(" · "), "busy");
      } else if (event === "token") {
        texts[data.role] += data.text;
        // The HH format puts a space after "Assistant:"; show the answer without it.
        view.cards[data.role].querySelector(".answer-text").textContent = texts[data.role].trimStart();
      } else if (event === "answer") {
        finishCard(view.cards[data.role], data, false);
      } else if (event === "result") {
        result = data;
      } else if (event === "error") {
        throw new Error(data.error.message);
      }
    }
    if (!result) throw new Error("the stream ended early");
    const turn = { prompt, answers: {}, preferred: null };
    for (const answer of result.answers) {
      turn.answers[answer.role] = answer.text.trim();
      finishCard(view.cards[answer.role], answer, compare);
    }
    turns.push(turn);
    wireTurn(view, turn, index);
    const stopped = result.answers.some((a) => a.finish_reason === "cancelled");
    setStatus(stopped ? "Stopped." : "", stopped ? "info" : "");
  } catch (error) {
    view.li.remove();
    if (!turns.length) $("empty").hidden = false;
    setStatus(error.name === "AbortError" ? "Stopped." : `Error ${error.message}`, error.name === "AbortError" ? "info" : "error");
  } finally {
    setRunning(null);
  }
}

function wireTurn(view, turn, index) {
  for (const [role, card] of Object.entries(view.cards)) {
    const copy = card.querySelector(".copy");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(turn.answers[role]);
        copy.textContent = "Copied";
      } catch (error) {
        copy.textContent = "Copy failed";
      }
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
    card.querySelector(".prefer").addEventListener("click", () => prefer(view, turn, index, role));
  }
  // Only the newest turn can be regenerated: later turns would depend on the old answer.
  document.querySelectorAll(".regen").forEach((b) => { b.hidden = true; });
  const regen = view.cards.policy.querySelector(".regen");
  regen.hidden = false;
  regen.addEventListener("click", () => {
    if (running || turns.length !== index + 1) return;
    turns.pop();
    view.li.remove();
    send(turn.prompt, Object.keys(view.cards).length > 1);
  });
}

async function prefer(view, turn, index, role) {
  const other = role === "policy" ? "reference" : "policy";
  const body = { prompt: turn.prompt, history: history(index), chosen: turn.answers[role], rejected: turn.answers[other] };
  const response = await fetch("/api/preference", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) { setStatus(`Error ${response.status}: ${data.error.message}`, "error"); return; }
  turn.preferred = role;
  for (const card of Object.values(view.cards)) {
    const button = card.querySelector(".prefer");
    button.disabled = true;
    card.classList.toggle("preferred", card.dataset.role === role);
    if (card.dataset.role === role) button.textContent = "Preferred ✓";
  }
  setStatus(`Saved to ${data.file} (${data.rows} ${data.rows === 1 ? "pair" : "pairs"}).`, "ok");
}

function cancelJob(jobId) {
  // Ask the server to stop this generation (a stopping criterion tied to the job); the stream then
  // ends normally with finish_reason "cancelled" and the partial answer.
  fetch(`/api/generate/${encodeURIComponent(jobId)}/cancel`, { method: "POST" }).catch(() => {});
}

function stop() {
  if (!running) return;
  running.cancelRequested = true;
  if (running.jobId) cancelJob(running.jobId);
  else running.controller.abort(); // not started yet: dropping the connection cancels it too
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value;
    if (running || !prompt.trim()) return;
    $("prompt").value = "";
    send(prompt, $("compare").checked);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    turns.length = 0;
    $("chat").replaceChildren();
    $("empty").hidden = false;
    setStatus("");
  });
  loadModel().catch((error) => setStatus(`Could not load model info: ${error.message}`, "error"));
});

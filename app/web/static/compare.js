// Compare: one prompt (or chat) decoded side by side as before, after, LDA at each alpha, any
// adapter / amplification config the server lists and, steered by a finished ADL job's δ, after and
// LDA again; streamed token by token through /generate_lda with `details`, so every column can be
// coloured by the same measure.

import { ApiError, curlCommand, getJSON, postJSON, stream } from "./api.js";
import { setupSteer, steerBody } from "./compare-steer.js";
import { appendPiece, applyDetails, highlight, legend, tokenArea } from "./tokens.js";
import { clearErrors, el, num, numberList, online, showError, text } from "./ui.js";

const form = () => document.getElementById("compare-form");
let running = null; // the AbortController of the run in progress

/** Column title for an alpha of the plain pair: -1 and 0 are the two models themselves. */
function pairTitle(alpha) {
  if (alpha === -1) return "before";
  if (alpha === 0) return "after";
  return `LDA α=${alpha}`;
}

function sampling() {
  const body = {
    n: num("c-n"),
    temperature: num("c-temperature"),
    top_p: num("c-top_p"),
    top_k: num("c-top_k"),
    max_new_tokens: num("c-max_new_tokens"),
    details: true,
  };
  const seed = num("c-seed");
  if (seed !== undefined) body.seed = seed;
  const stop = text("c-stop");
  if (stop) body.stop = [stop];
  return body;
}

function parseMessages(value) {
  return value
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean)
    .map((line) => {
      const m = line.match(/^(system|user|assistant)\s*:\s*(.*)$/i);
      // A line without a role is sent as a user message; the server says if that breaks the template.
      return m ? { role: m[1].toLowerCase(), content: m[2] } : { role: "user", content: line };
    });
}

/**
 * Chat messages -> the raw prompt /generate_lda decodes (`apply_chat_template: false`). The API has
 * no messages field there, so the page renders the template with /tokenize and /detokenize and keeps
 * the text only if tokenizing it as a raw prompt gives the template's exact ids (no double BOS).
 */
async function chatPrompt(messages) {
  const { tokens } = await postJSON("/tokenize", { messages, add_generation_prompt: true });
  const same = (a, b) => a.length === b.length && a.every((t, i) => t === b[i]);
  for (const skip of [0, 1]) {
    const { prompt } = await postJSON("/detokenize", { tokens: tokens.slice(skip) });
    const again = await postJSON("/tokenize", { prompt });
    if (same(again.tokens, tokens)) return prompt;
  }
  throw Object.assign(new ApiError(422, {
    error: { message: "messages: the chat template's tokens do not survive a round trip as a raw prompt", param: "messages" },
  }));
}

async function promptFields() {
  const chat = form().querySelector('input[name="input-mode"]:checked').value === "chat";
  const system = text("c-system").trim();
  if (!chat) return { prompt: text("c-prompt"), ...(system ? { system_prompt: system } : {}) };
  const messages = parseMessages(text("c-chat"));
  if (system) messages.unshift({ role: "system", content: system });
  return { prompt: await chatPrompt(messages), apply_chat_template: false };
}

/** The selected extra columns: registered adapters (adapter-mode LDA) and compiled configs. */
function extras() {
  return [...document.querySelectorAll("#c-extras input:checked")].map((b) => ({
    kind: b.dataset.kind,
    name: b.value,
  }));
}

/** Every /generate_lda request of a run, each with the column title of each of its alphas. */
function plan(base, alphas) {
  const pairAlphas = [...new Set([-1, 0, ...alphas])];
  const requests = [{ body: { ...base, alphas: pairAlphas }, titles: pairAlphas.map(pairTitle) }];
  const steer = steerBody();
  if (steer) {
    // The steered after model and LDA against the before model (alpha -1 would be the before model again).
    const steered = [...new Set([0, ...alphas])];
    const tag = steer.random_seed === undefined ? "steer" : "random steer";
    requests.push({ body: { ...base, alphas: steered, steer }, titles: steered.map((a) => `${pairTitle(a)} + ${tag}`) });
  }
  for (const x of extras()) {
    if (x.kind === "adapter") {
      const a = alphas.length ? alphas : [1];
      requests.push({ body: { ...base, alphas: a, adapter: x.name }, titles: a.map((v) => `${x.name} α=${v}`) });
    } else {
      // alpha 0 of adapter mode is the base with the config merged: the amplified model itself.
      requests.push({ body: { ...base, alphas: [0], amplification: x.name }, titles: [`config ${x.name}`] });
    }
  }
  return requests;
}

function sampleCard(request, alpha, seed) {
  const area = tokenArea();
  const seedLabel = el("span", { class: "seed" }, seed === undefined ? "seed –" : `seed ${seed}`);
  const status = el("span", { class: "muted status" }, "streaming…");
  const curlOut = el("pre", { class: "curl", hidden: true });
  const curlButton = el("button", { type: "button", class: "small", disabled: true }, "copy as curl");
  const card = el("article", { class: "sample" },
    el("header", {}, seedLabel, status, curlButton), area, curlOut);
  card.area = area;
  card.finish = (row) => {
    seedLabel.textContent = `seed ${row.seed}`;
    status.textContent = `${row.tokens_generated} tokens, ${row.finish_reason}`;
    if (row.details) applyDetails(area, row.details);
    curlButton.disabled = false;
    curlButton.onclick = () => copyCurl(curlOut, reproduce(request.body, alpha, row.seed));
    refreshSearch();
  };
  card.fail = (message) => {
    if (status.textContent !== "streaming…") return; // this row had its result already
    status.textContent = "";
    card.append(el("p", { class: "field-error" }, message));
  };
  return card;
}

/** The body that decodes one row alone: its alpha and seed, n = 1, everything else as sent. */
function reproduce(body, alpha, seed) {
  const { alphas, n, ...rest } = body;
  return { ...rest, alpha, seed };
}

async function copyCurl(out, body) {
  const command = curlCommand("/generate_lda", body);
  out.textContent = command;
  out.hidden = false;
  try {
    await navigator.clipboard.writeText(command);
    out.dataset.copied = "yes";
  } catch {
    // No clipboard outside a secure context (plain http to a pod): the command is shown to select.
    out.dataset.copied = "no";
  }
}

function columnFor(title) {
  const list = el("div", { class: "samples" });
  const col = el("section", { class: "column", "aria-label": title }, el("h3", {}, title), list);
  col.list = list;
  return col;
}

/** Lay out the columns of one request and stream it into them. */
async function runRequest(request, columns, signal) {
  const n = request.body.n || 1;
  const cards = [];
  request.body.alphas.forEach((alpha, a) => {
    const col = columnFor(request.titles[a]);
    columns.append(col);
    for (let k = 0; k < n; k++) {
      const seed = request.body.seed === undefined ? undefined : request.body.seed + a * n + k;
      const card = sampleCard(request, alpha, seed);
      col.list.append(card);
      cards.push(card);
    }
  });
  try {
    await stream("/generate_lda", request.body, (name, data) => {
      if (name === "token") {
        appendPiece(cards[data.row].area, data.token_id, data.text);
        refreshSearch();
      } else if (name === "result") {
        data.results.forEach((row, i) => cards[i].finish(row));
      }
    }, signal);
  } catch (exc) {
    for (const c of cards) c.fail(exc.name === "AbortError" ? "stopped" : exc.message);
    throw exc;
  }
}

async function run() {
  const f = form();
  clearErrors(f);
  online();
  running?.abort();
  const controller = (running = new AbortController());
  const columns = document.getElementById("columns");
  columns.replaceChildren();
  setRunning(true);
  try {
    const base = { ...(await promptFields()), ...sampling() };
    const alphas = numberList(text("c-alphas"));
    const results = await Promise.allSettled(plan(base, alphas).map((r) => runRequest(r, columns, controller.signal)));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) showError(f, failed.reason, run);
  } catch (exc) {
    showError(f, exc, run);
  } finally {
    if (running === controller) setRunning(false);
  }
}

function setRunning(on) {
  document.getElementById("c-run").disabled = on;
  document.getElementById("c-halt").disabled = !on;
}

function refreshSearch() {
  const needle = text("c-search").trim();
  const areas = document.querySelectorAll("#columns .tokens");
  const hits = highlight(areas, needle);
  document.getElementById("c-search-count").textContent = needle ? `in ${hits} of ${areas.length} samples` : "";
}

let wanted = null; // an adapter another view asked to compare, ticked at the next load

/** Tick `name` in "Also compare" when the list next loads (the Compare tab loads it on opening). */
export function selectExtra(name) {
  wanted = name;
}

/** Fill "Also compare" from /adapters and the compiled lora_names /v1/models lists. */
export async function loadExtras() {
  const box = document.getElementById("c-extras");
  const want = wanted;
  const [{ adapters }, models] = await Promise.all([getJSON("/adapters"), getJSON("/v1/models")]);
  // Read the ticks after the fetch, and keep the wanted name until a list with it is drawn: two loads
  // may overlap (the page's first and a tab switch), and the last one drawn must keep both.
  const checked = new Set(extras().map((x) => x.name));
  if (wanted) checked.add(wanted);
  const adapterNames = new Set(adapters.map((a) => a.name));
  const fixed = new Set(["after", "before", "lda"]);
  // Every other card with a parent is a compiled config (the after / before aliases and `lda` aside).
  const configs = models.data.filter((m) => m.parent && !fixed.has(m.id) && !adapterNames.has(m.id)).map((m) => m.id);
  const option = (kind, name, label) =>
    el("label", { class: "check" },
      el("input", { type: "checkbox", value: name, "data-kind": kind, checked: checked.has(name) }), ` ${label}`);
  const items = [
    ...adapters.map((a) => option("adapter", a.name, `adapter ${a.name}`)),
    ...configs.map((id) => option("config", id, `config ${id}`)),
  ];
  box.replaceChildren(...(items.length ? items : [el("span", { class: "muted" }, "none listed")]));
  if (wanted === want) wanted = null;
}

export function setupCompare() {
  document.getElementById("legend").append(legend());
  form().addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
  document.getElementById("c-halt").addEventListener("click", () => running?.abort());
  document.getElementById("c-search").addEventListener("input", refreshSearch);
  setupSteer((exc) => showError(form(), exc));
  for (const radio of form().querySelectorAll('input[name="input-mode"]')) {
    radio.addEventListener("change", () => {
      const chat = radio.value === "chat" && radio.checked;
      document.getElementById("prompt-field").hidden = chat;
      document.getElementById("chat-field").hidden = !chat;
    });
  }
}

// Experiments: submit a small hunt, watch progress, plot hit rate against alpha with 95% intervals,
// and browse the hits. A hit can be replayed through /generate_lda with `details` to colour it
// (stored samples keep text only), using the seed and sampling fields the experiment stored.

import { getJSON, postJSON, stream } from "./api.js";
import { ratePlot } from "./plot.js";
import { appendPiece, applyDetails, highlight, tokenArea } from "./tokens.js";
import { clearErrors, el, fill, listEntry, num, numberList, online, pct, progressBar, showError, text } from "./ui.js";

const form = () => document.getElementById("exp-form");
let selected = null;
let timer = null;
const ACTIVE = ["queued", "running"];

function request() {
  const marker = text("e-marker").trim();
  return {
    name: text("e-name").trim() || "experiment",
    prompts: text("e-prompts").split("\n").map((p) => p.trim()).filter(Boolean),
    alphas: numberList(text("e-alphas")),
    n: num("e-n"),
    max_new_tokens: num("e-max_new_tokens"),
    temperature: num("e-temperature"),
    seed: num("e-seed"),
    control: document.getElementById("e-control").checked,
    detectors: [{ name: marker || "marker", type: "substring", patterns: [marker] }],
  };
}

async function submit() {
  clearErrors(form());
  online();
  try {
    const { id } = await postJSON("/experiments", request());
    selected = id;
    await refresh();
  } catch (exc) {
    showError(form(), exc, submit);
  }
}

function listItem(exp) {
  const { done, total } = exp.progress;
  return listEntry({ id: exp.id, title: exp.name, status: exp.status, done, total, count: `${done}/${total}`,
    current: exp.id === selected, onSelect: () => select(exp.id) });
}

async function select(id) {
  selected = id;
  await refresh();
}

/** Poll the list (and the selected experiment) while anything is still running. */
export async function refresh() {
  clearTimeout(timer);
  try {
    const { experiments } = await getJSON("/experiments");
    experiments.sort((a, b) => b.created - a.created);
    document.getElementById("exp-list").replaceChildren(...experiments.map(listItem));
    const detail = selected ? await showDetail(selected) : null;
    // The detail is read after the list: when it already says final, its list entry is stale, and
    // no later poll would redraw it. Draw the entry from the detail.
    const shown = experiments.map((e) => (detail && e.id === detail.id ? detail : e));
    if (shown.some((e, i) => e !== experiments[i])) document.getElementById("exp-list").replaceChildren(...shown.map(listItem));
    const active = shown.filter((e) => ACTIVE.includes(e.status));
    if (active.length) timer = setTimeout(refresh, 1000);
  } catch (exc) {
    showError(form(), exc, refresh);
  }
}

async function showDetail(id) {
  const exp = await getJSON(`/experiments/${id}`);
  const panel = document.getElementById("exp-detail");
  const rows = exp.summary.map((r) =>
    el("tr", {}, el("td", {}, r.condition), el("td", {}, r.detector), el("td", { class: "num" }, `${r.hits} / ${r.total}`),
      el("td", { class: "num" }, pct(r.rate)), el("td", { class: "num" }, `[${pct(r.ci95[0])}, ${pct(r.ci95[1])}]`)));
  const hits = el("div", { class: "hits" });
  fill(panel,
    el("h2", {}, `${exp.name} `, el("span", { class: `status s-${exp.status}` }, exp.status)),
    exp.error ? el("p", { class: "field-error" }, exp.error) : null,
    progressBar(exp.progress.done, exp.progress.total, "progress"),
    ratePlot(exp.summary, `${exp.name}: hit rate against alpha, 95% intervals`),
    el("table", { class: "summary" },
      el("thead", {}, el("tr", {}, ["condition", "detector", "hits", "rate", "95% CI"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
    el("h3", {}, "Hits"),
    hits,
  );
  await showHits(exp, hits);
  return exp;
}

async function showHits(exp, box) {
  const page = await getJSON(`/experiments/${exp.id}/samples?hit=true&limit=20`);
  const markers = exp.spec.detectors.flatMap((d) => d.patterns || []);
  if (!page.samples.length) box.append(el("p", { class: "muted" }, "No hits yet."));
  for (const s of page.samples) box.append(hitCard(exp, s, markers));
  if (page.total > page.samples.length) box.append(el("p", { class: "muted" }, `${page.samples.length} of ${page.total} hits shown.`));
}

function hitCard(exp, sample, markers) {
  const area = tokenArea();
  // Stored samples have text only: one piece per marker occurrence and one per stretch between,
  // so the highlight outlines the marker, not the whole answer.
  for (const piece of splitOn(sample.completion, markers[0])) appendPiece(area, null, piece);
  highlight([area], markers[0]);
  const prompt = typeof sample.prompt === "string" ? sample.prompt : sample.prompt.map((m) => `${m.role}: ${m.content}`).join(" / ");
  const replay = typeof sample.prompt === "string"
    ? el("button", { type: "button", class: "small", onclick: (e) => colourHit(exp, sample, area, markers, e.target) }, "colour tokens")
    : null;
  return el("article", { class: "sample hit" },
    el("header", {}, el("span", {}, sample.condition), el("span", { class: "seed" }, `seed ${sample.seed}`), replay),
    el("p", { class: "muted small" }, prompt), area);
}

function splitOn(text, marker) {
  if (!marker) return [text];
  const escaped = marker.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return text.split(new RegExp(`(${escaped})`, "i")).filter(Boolean);
}

/** Reproduce the hit alone (its seed, alpha and the experiment's sampling) with per-token details. */
async function colourHit(exp, sample, area, markers, button) {
  const condition = exp.spec.conditions[sample.condition_index];
  const body = { ...exp.spec.sampling, prompt: sample.prompt, seed: sample.seed, details: true,
    alpha: condition.control ? -1 : condition.alpha };
  for (const k of ["adapter", "amplification"]) if (condition[k] !== undefined) body[k] = condition[k];
  for (const [k, v] of Object.entries(body)) if (v === null) delete body[k];
  button.disabled = true;
  area.replaceChildren();
  try {
    await stream("/generate_lda", body, (name, data) => {
      if (name === "token") appendPiece(area, data.token_id, data.text);
      else if (name === "result") applyDetails(area, data.results[0].details);
    });
    highlight([area], markers[0]);
  } catch (exc) {
    showError(form(), exc, () => colourHit(exp, sample, area, markers, button));
  }
}

export function setupExperiments() {
  form().addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
}

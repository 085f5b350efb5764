// "Describe with interpreter": a finished weight-diff job's tasks asked, all in one batch, what they
// were trained on (POST /dit/describe), through a DIT interpreter L (M + W + L) or none (M + W, the
// base-question baseline). Tasks not yet registered are registered first, under the name
// `register: true` gives them, because /dit/describe takes registered adapters.

import { getJSON, postJSON } from "./api.js";
import { clearErrors, el, showError } from "./ui.js";

const DEFAULT_QUESTION = "What topic have you been trained on?";
// Per job: what the form held and the last answers, so a re-render (the list polls) keeps them.
const state = new Map();

/** Interpreters: adapters registered by finished /dit/jobs, then any other adapter named dit-*. */
async function interpreters(adapterNames) {
  const { jobs } = await getJSON("/dit/jobs");
  const names = jobs.filter((j) => j.status === "done" && j.registered && adapterNames.has(j.registered))
    .sort((a, b) => b.created - a.created).map((j) => j.registered);
  for (const name of [...adapterNames].sort()) if (name.startsWith("dit-") && !names.includes(name)) names.push(name);
  return names;
}

/** "Sun, Cat" or one per line -> ["Sun", "Cat"]; empty -> none (no log-probs asked). */
function candidateList(value) {
  const items = value.split(value.includes("\n") ? "\n" : ",").map((s) => s.trim()).filter(Boolean);
  return items.length ? items : undefined;
}

function field(id, label, input, param) {
  return el("div", { class: "field", "data-param": param }, el("label", { for: id }, label), input);
}

/**
 * The section for a finished job. `known` is the set of registered adapter names; `registerTask`
 * registers a task's output and resolves to its adapter name.
 */
export function describeSection(job, known, registerTask) {
  const tasks = job.task_names.filter((t) => job.outputs[t]);
  if (job.status !== "done" || !tasks.length) return null;
  const s = state.get(job.id) || { dit: null, question: DEFAULT_QUESTION, candidates: "", results: null };
  state.set(job.id, s);
  const select = el("select", { id: "d-dit" }, el("option", { value: "" }, "none: M + W (the base question)"));
  const question = el("input", { id: "d-question", type: "text", value: s.question });
  const candidates = el("input", { id: "d-candidates", type: "text", value: s.candidates,
    placeholder: "optional: Sun, Cat (scored by log-probability)" });
  const out = el("div", { id: "d-results" }, s.results ? resultsTable(s.results) : null);
  const form = el("form", { id: "describe-form", class: "describe", novalidate: true },
    el("h3", {}, "Describe with interpreter"),
    el("div", { class: "grid" },
      field("d-dit", "Interpreter (DIT adapter)", select, "dit"),
      field("d-question", "Question", question, "question"),
      field("d-candidates", "Candidates", candidates, "candidates")),
    el("p", { class: "form-error", role: "alert", hidden: true }),
    el("div", { class: "actions" }, el("button", { type: "submit", class: "primary", id: "d-run" }, "Describe")),
    out);
  interpreters(known).then((names) => {
    for (const name of names) select.append(el("option", { value: name }, name));
    select.value = s.dit && names.includes(s.dit) ? s.dit : names[0] || "";
    s.dit = select.value || null;
  }).catch((exc) => showError(form, exc, () => {}));
  select.addEventListener("change", () => { s.dit = select.value || null; });
  question.addEventListener("input", () => { s.question = question.value; });
  candidates.addEventListener("input", () => { s.candidates = candidates.value; });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors(form);
    const button = form.querySelector("#d-run");
    button.disabled = true;
    try {
      const names = [];
      for (const task of tasks) names.push(await registerTask(task));
      const body = { dit: select.value || null, diffs: names, question: question.value,
        candidates: candidateList(candidates.value) };
      const { results } = await postJSON("/dit/describe", body);
      s.results = results.map((r, i) => ({ ...r, task: tasks[i] }));
      out.replaceChildren(resultsTable(s.results));
    } catch (exc) {
      showError(form, exc, () => form.requestSubmit());
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function resultsTable(results) {
  const scored = results.some((r) => r.candidates.length);
  const head = ["task", "diff", "answer", ...(scored ? ["best candidate (log p)"] : [])];
  return el("table", { class: "summary describe-results" },
    el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, results.map((r) => el("tr", { "data-task": r.task },
      el("td", {}, r.task), el("td", {}, r.diff), el("td", { class: "answer" }, r.text),
      scored ? el("td", { class: "best" }, best(r.candidates)) : null))));
}

function best(candidates) {
  const top = candidates.reduce((a, b) => (b.logprob > a.logprob ? b : a));
  return `${top.text} (${top.logprob.toFixed(2)})`;
}

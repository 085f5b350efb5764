// Weight-diff jobs: submit, watch progress and per-task loss curves, register a finished task's
// LoRA as an adapter (POST /adapters with the job's output folder) and open it in Compare, or ask
// the finished tasks what they encode through a DIT interpreter (dit.js).

import { getJSON, postJSON } from "./api.js";
import { selectExtra } from "./compare.js";
import { describeSection } from "./dit.js";
import { lossPlot } from "./plot.js";
import { clearErrors, el, fill, listEntry, num, online, showError, text } from "./ui.js";

const form = () => document.getElementById("job-form");
let selected = null;
let timer = null;
let openTab = null; // set by main.js: switch to a view by name
let known = new Set(); // registered adapter names: a diff registered from this page is not in its job record

/** "task: text" lines -> tasks in first-seen order, each with its samples. */
function tasks() {
  const byName = new Map();
  for (const line of text("j-tasks").split("\n").map((l) => l.trim()).filter(Boolean)) {
    const m = line.match(/^([A-Za-z0-9_-]{1,40})\s*:\s*(.+)$/);
    const [name, sample] = m ? [m[1], m[2]] : [`task${byName.size}`, line];
    if (!byName.has(name)) byName.set(name, []);
    byName.get(name).push(sample);
  }
  return [...byName].map(([name, samples]) => ({ name, samples }));
}

async function submit() {
  clearErrors(form());
  online();
  try {
    const body = { tasks: tasks(), r: num("j-r"), lr: num("j-lr"), steps: num("j-steps"),
      register: document.getElementById("j-register").checked };
    const { id } = await postJSON("/weightdiff/jobs", body);
    selected = id;
    await refresh();
  } catch (exc) {
    showError(form(), exc, submit);
  }
}

function listItem(job) {
  return listEntry({ id: job.id, title: `${job.id} (${job.task_names.length} tasks)`, status: job.status,
    done: job.step, total: job.total_steps || job.step || 1, count: `step ${job.step}/${job.total_steps ?? "?"}`,
    current: job.id === selected, onSelect: () => select(job.id) });
}

async function select(id) {
  selected = id;
  await refresh();
}

export async function refresh() {
  clearTimeout(timer);
  try {
    const [{ jobs }, { adapters }] = await Promise.all([getJSON("/weightdiff/jobs"), getJSON("/adapters")]);
    known = new Set(adapters.map((a) => a.name));
    jobs.sort((a, b) => b.created - a.created);
    document.getElementById("job-list").replaceChildren(...jobs.map(listItem));
    const job = jobs.find((j) => j.id === selected);
    if (job) showDetail(job);
    if (jobs.some((j) => j.status === "queued" || j.status === "running")) timer = setTimeout(refresh, 1000);
  } catch (exc) {
    showError(form(), exc, refresh);
  }
}

function showDetail(job) {
  const panel = document.getElementById("job-detail");
  const rows = job.task_names.map((name, t) => {
    const losses = job.losses[t] || [];
    return el("tr", {}, el("td", {}, name),
      el("td", { class: "num" }, losses.length ? losses[losses.length - 1].toFixed(4) : "–"),
      el("td", { class: "adapter", "data-task": name }, adapterCell(job, name)));
  });
  fill(panel,
    el("h2", {}, `Job ${job.id} `, el("span", { class: `status s-${job.status}` }, job.status)),
    job.error ? el("p", { class: "field-error" }, job.error) : null,
    lossPlot(job.losses, job.task_names, "loss per step, one line per task"),
    el("table", { class: "summary" },
      el("thead", {}, el("tr", {}, ["task", "last loss", "adapter"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)),
    describeSection(job, known, (task) => ensureRegistered(job, task)),
  );
}

function adapterCell(job, task) {
  const registered = registeredName(job, task);
  if (registered) return useButton(registered);
  if (!job.outputs[task]) return el("span", { class: "muted" }, "not trained yet");
  return el("button", { type: "button", class: "small", onclick: (e) => register(job, task, e.target) }, "register as adapter");
}

function registeredName(job, task) {
  return job.registered[task] || (known.has(`wd-${job.id}-${task}`) ? `wd-${job.id}-${task}` : null);
}

/** The task's adapter, registered now under the name `register: true` would give when it is not yet. */
async function ensureRegistered(job, task) {
  const existing = registeredName(job, task);
  if (existing) return existing;
  const name = `wd-${job.id}-${task}`;
  await postJSON("/adapters", { name, source: job.outputs[task], replace: true });
  known.add(name);
  document.querySelector(`#job-detail td.adapter[data-task="${task}"]`)?.replaceChildren(useButton(name));
  return name;
}

async function register(job, task, button) {
  button.disabled = true;
  try {
    await ensureRegistered(job, task); // swaps this cell's button for "use NAME in Compare"
  } catch (exc) {
    button.disabled = false;
    showError(form(), exc, () => register(job, task, button));
  }
}

function useButton(name) {
  return el("button", { type: "button", class: "small", onclick: () => useInCompare(name) }, `use ${name} in Compare`);
}

function useInCompare(name) {
  selectExtra(name);
  openTab("compare");
}

export function setupJobs(open) {
  openTab = open;
  form().addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
}

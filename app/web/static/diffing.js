// Diffing jobs (POST /diffing/jobs, method logit_diff): the form, the job list with progress, and
// the selected job with cancel / delete; a finished job's result is drawn by diffing-result.js.

import { ApiError, del, getJSON, postJSON } from "./api.js";
import { resultSections } from "./diffing-result.js";
import { clearErrors, el, fill, listEntry, num, online, progressBar, showError, text } from "./ui.js";

const form = () => document.getElementById("diff-form");
const SOURCES = { texts: "f-texts-field", prompts_file: "f-file-field", dataset: "f-dataset-field" };
const ACTIVE = new Set(["queued", "running"]);
const TAG = "logit_diff.";
let selected = null;
let timer = null;
let shown = null; // what the detail shows ("id status step"): a poll that changes nothing leaves it alone
const results = new Map(); // job id -> GET .../result (every kept example): fetched once per job

function source() {
  return form().querySelector("input[name='diff-source']:checked").value;
}

/** The textarea: a JSON list as it is, else one text per block between blank lines. */
function texts() {
  const value = text("f-texts").trim();
  if (!value.startsWith("[")) return value.split(/\n[ \t]*\n/).map((t) => t.trim()).filter(Boolean);
  try {
    return JSON.parse(value);
  } catch (exc) {
    throw new ApiError(422, { error: { message: `texts: not a JSON list (${exc.message})`, param: "texts" } });
  }
}

function sourceBody() {
  const kind = source();
  if (kind === "prompts_file") return { prompts_file: text("f-file").trim() };
  if (kind === "dataset") {
    return { dataset: { path: text("f-dataset").trim(), split: text("f-split").trim() || undefined,
      column: text("f-column").trim() || undefined } };
  }
  return { texts: texts() };
}

async function submit() {
  clearErrors(form());
  online();
  try {
    const topics = num("f-nmf");
    const body = { method: "logit_diff", ...sourceBody(), dataset_name: text("f-dataset_name").trim() || undefined,
      max_tokens_per_sample: num("f-max_tokens_per_sample"), top_k: num("f-top_k"), max_samples: num("f-max_samples"),
      batch_size: num("f-batch_size"), kl_reverse: document.getElementById("f-kl_reverse").checked,
      nmf: topics === undefined ? undefined : { num_topics: topics } };
    const { id } = await postJSON("/diffing/jobs", body);
    selected = id;
    await refresh();
  } catch (exc) {
    showError(form(), untagged(exc), submit);
  }
}

/** The body is one of the methods' bodies: a 422 names a field under the method ("logit_diff.top_k"). */
function untagged(exc) {
  if (exc instanceof ApiError && exc.param?.startsWith(TAG)) {
    exc.param = exc.param.slice(TAG.length);
    exc.message = exc.message.replace(TAG, "");
  }
  return exc;
}

function listItem(job) {
  return listEntry({ id: job.id, title: `${job.id} · ${job.spec.method} · ${job.spec.dataset_name}`, status: job.status,
    done: job.step, total: job.total_steps || 1, count: `batch ${job.step}/${job.total_steps ?? "?"}`,
    current: job.id === selected, onSelect: () => select(job.id) });
}

async function select(id) {
  selected = id;
  await refresh();
}

export async function refresh() {
  clearTimeout(timer);
  try {
    const { jobs } = await getJSON("/diffing/jobs");
    jobs.sort((a, b) => b.created - a.created);
    document.getElementById("diff-list").replaceChildren(...jobs.map(listItem));
    await showDetail(jobs.find((j) => j.id === selected));
    clearTimeout(timer); // a refresh that overlapped this one may have set one: keep a single poll
    if (jobs.some((j) => ACTIVE.has(j.status))) timer = setTimeout(refresh, 1000);
  } catch (exc) {
    showError(form(), exc, refresh);
  }
}

async function showDetail(job) {
  const panel = document.getElementById("diff-detail");
  const key = job ? `${job.id} ${job.status} ${job.step}` : "";
  if (key === shown) return;
  if (!job) {
    shown = key;
    fill(panel, el("p", { class: "muted" }, "Select a job."));
    return;
  }
  const mined = job.status === "done" && job.spec.method === "logit_diff";
  if (mined && !results.has(job.id)) results.set(job.id, await getJSON(job.links.result));
  if (selected !== job.id) return; // another job was selected while the result loaded
  shown = key;
  fill(panel, header(job), job.error ? el("p", { class: "field-error" }, job.error) : null,
    mined ? resultSections(job, results.get(job.id)) : null,
    job.status === "done" && !mined ? otherMethod(job) : null);
}

/** Methods this view does not draw (ADL): their files. */
function otherMethod(job) {
  return el("p", { class: "small" }, `This view draws logit_diff results; this ${job.spec.method} job's are in `,
    el("a", { href: job.links.result }, "result.json"), " and ", el("a", { href: job.links.zip, download: true }, "results.zip"), ".");
}

function header(job) {
  const s = job.spec;
  const what = [s.method, `${s.num_rows} rows`, `${s.max_tokens_per_sample} tokens each`, s.top_k ? `top-k ${s.top_k}` : null,
    `batch ${s.batch_size}`, s.nmf ? `${s.nmf.num_topics} NMF topics` : null, s.kl_reverse ? "reverse KL" : null];
  const action = ACTIVE.has(job.status)
    ? el("button", { type: "button", class: "small", id: "diff-cancel", onclick: () => act(`/diffing/jobs/${job.id}`) }, "Cancel")
    : el("button", { type: "button", class: "small", id: "diff-delete", onclick: () => remove(job.id) }, "Delete");
  return el("div", { class: "diff-head" },
    el("h2", {}, `Job ${job.id} `, el("span", { class: `status s-${job.status}` }, job.status)),
    el("p", { class: "muted small" }, what.filter(Boolean).join(" · ")),
    el("div", { class: "actions" }, progressBar(job.step, job.total_steps || 1, `job ${job.id} progress`),
      el("span", { class: "muted small" }, `batch ${job.step}/${job.total_steps ?? "?"}`), action));
}

async function act(path) {
  try {
    await del(path);
  } catch (exc) {
    showError(form(), exc, () => act(path));
  }
  await refresh();
}

async function remove(id) {
  results.delete(id);
  selected = null;
  await act(`/diffing/jobs/${id}?purge=true`);
}

export function setupDiffing() {
  form().addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  for (const radio of form().querySelectorAll("input[name='diff-source']")) {
    radio.addEventListener("change", () => {
      for (const [kind, id] of Object.entries(SOURCES)) document.getElementById(id).hidden = kind !== source();
    });
  }
}

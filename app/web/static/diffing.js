// Diffing jobs (POST /diffing/jobs, method logit_diff or adl): the form, the job list with progress,
// and the selected job with cancel / delete; a finished job's result is drawn by diffing-result.js
// (logit_diff) or diffing-adl.js (adl).

import { ApiError, del, getJSON, postJSON } from "./api.js";
import { selectSteer } from "./compare-steer.js";
import { adlSections } from "./diffing-adl.js";
import { resultSections } from "./diffing-result.js";
import { clearErrors, el, fill, listEntry, num, numberList, online, progressBar, showError, text } from "./ui.js";

const form = () => document.getElementById("diff-form");
const SOURCES = { texts: "f-texts-field", prompts_file: "f-file-field", dataset: "f-dataset-field" };
const ACTIVE = new Set(["queued", "running"]);
const TAGS = ["logit_diff.", "adl."];
let selected = null;
let openTab = null; // set by main.js: switch to a view by name
let timer = null;
let shown = null; // what the detail shows ("id status step"): a poll that changes nothing leaves it alone
// job id -> {record: GET /diffing/jobs/{id}, full: GET .../result}: fetched once per finished job
// (the list has no results; the whole result has every kept example, every scale).
const results = new Map();

function source() {
  return form().querySelector("input[name='diff-source']:checked").value;
}

function method() {
  return form().querySelector("input[name='diff-method']:checked").value;
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
    const common = { ...sourceBody(), dataset_name: text("f-dataset_name").trim() || undefined,
      max_tokens_per_sample: num("f-max_tokens_per_sample"), max_samples: num("f-max_samples"), batch_size: num("f-batch_size") };
    const { id } = await postJSON("/diffing/jobs", method() === "adl" ? adlBody(common) : miningBody(common));
    selected = id;
    await refresh();
  } catch (exc) {
    showError(form(), untagged(exc), submit);
  }
}

function miningBody(common) {
  const topics = num("f-nmf");
  return { method: "logit_diff", ...common, top_k: num("f-top_k"), kl_reverse: document.getElementById("f-kl_reverse").checked,
    nmf: topics === undefined ? undefined : { num_topics: topics } };
}

/** ADL's body as JSON text: a layer is sent as typed, since "1.0" (a fraction: the last block) and "1" (block 1) differ. */
function adlBody(common) {
  const url = text("f-grader-url").trim();
  const grader = url ? { base_url: url, model: text("f-grader-model").trim(), api_key: text("f-grader-key") || undefined } : undefined;
  const body = { layers: "@LAYERS@", method: "adl", ...common, grader,
    patchscope_positions: numberList(text("f-patchscope_positions")) };
  const layers = text("f-layers").split(/[\s,]+/).filter(Boolean).map(layerJSON);
  return JSON.stringify(body).replace('"@LAYERS@"', `[${layers.join(",")}]`); // the first occurrence: `layers` is first
}

function layerJSON(s) {
  const x = Number(s);
  if (Number.isNaN(x) || !Number.isFinite(x)) return JSON.stringify(s); // the server says why
  return /^[+-]?\d+$/.test(s) || !Number.isInteger(x) ? String(x) : `${x}.0`;
}

/** The body is one of the methods' bodies: a 422 may name a field under the method ("logit_diff.top_k"). */
function untagged(exc) {
  const tag = TAGS.find((t) => exc instanceof ApiError && exc.param?.startsWith(t));
  if (tag) {
    exc.param = exc.param.slice(tag.length);
    exc.message = exc.message.replace(tag, "");
  }
  if (exc.param?.startsWith("grader.")) form().querySelector("details.grader").open = true;
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
  const done = job.status === "done";
  if (done && !results.has(job.id)) {
    const [record, full] = await Promise.all([getJSON(`/diffing/jobs/${job.id}`), getJSON(job.links.result)]);
    results.set(job.id, { record, full });
  }
  if (selected !== job.id) return; // another job was selected while the result loaded
  shown = key;
  const got = results.get(job.id);
  const adl = job.spec.method === "adl";
  fill(panel, header(done ? got.record : job), job.error ? el("p", { class: "field-error" }, job.error) : null,
    done && !adl ? resultSections(got.record, got.full) : null,
    done && adl ? adlSections(got.record, got.full, steerInCompare) : null);
}

function steerInCompare(steer) {
  selectSteer(steer);
  openTab("compare");
}

function header(job) {
  const s = job.spec;
  const blocks = job.result?.layers?.map((l) => l.layer); // the spec's 1.0 reads as 1 here: the blocks it meant
  const what = [s.method, `${s.num_rows} rows`, `${s.max_tokens_per_sample} tokens each`, s.top_k ? `top-k ${s.top_k}` : null,
    blocks ? `block${blocks.length > 1 ? "s" : ""} ${blocks.join(", ")}` : null,
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

export function setupDiffing(open) {
  openTab = open;
  form().addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  for (const radio of form().querySelectorAll("input[name='diff-source']")) {
    radio.addEventListener("change", () => {
      for (const [kind, id] of Object.entries(SOURCES)) document.getElementById(id).hidden = kind !== source();
    });
  }
  for (const radio of form().querySelectorAll("input[name='diff-method']")) {
    radio.addEventListener("change", () => {
      const adl = method() === "adl";
      for (const node of form().querySelectorAll(".adl-only")) node.hidden = !adl;
      for (const node of form().querySelectorAll(".mining-only")) node.hidden = adl;
    });
  }
}

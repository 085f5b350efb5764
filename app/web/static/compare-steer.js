// Compare's "Steer (ADL)" fields: the finished ADL jobs of GET /diffing/jobs, the chosen job's
// blocks, and the `steer` body (POST /generate_lda) of the steered columns Compare adds.

import { getJSON } from "./api.js";
import { el, num, text } from "./ui.js";

let wantedSteer = null; // {adl, layer, position, strength} another view asked for, applied at the next load
const steerJobs = new Map(); // ADL job id -> GET /diffing/jobs/{id} (its blocks and positions)

/** Choose this ADL job, block, position and strength in "Steer" when the list next loads. */
export function selectSteer(steer) {
  wantedSteer = steer;
}

/** Fill "Steer" from the finished ADL jobs of GET /diffing/jobs. */
export async function loadSteerJobs() {
  const select = document.getElementById("c-steer-adl");
  const { jobs } = await getJSON("/diffing/jobs");
  const adl = jobs.filter((j) => j.spec.method === "adl" && j.status === "done").sort((a, b) => b.created - a.created);
  const keep = wantedSteer?.adl ?? select.value;
  select.replaceChildren(el("option", { value: "" }, "off"),
    ...adl.map((j) => el("option", { value: j.id }, `${j.id} · ${j.spec.dataset_name} · ${j.spec.num_rows} rows`)));
  select.value = adl.some((j) => j.id === keep) ? keep : "";
  await steerJobChosen();
}

/** A job chosen (or "off"): its blocks in the block select, the other fields enabled. */
async function steerJobChosen() {
  const id = text("c-steer-adl");
  const want = wantedSteer?.adl === id ? wantedSteer : null;
  wantedSteer = null;
  const layer = document.getElementById("c-steer-layer");
  for (const f of ["layer", "position", "strength", "random_seed"]) document.getElementById(`c-steer-${f}`).disabled = !id;
  if (!id) return;
  if (!steerJobs.has(id)) steerJobs.set(id, await getJSON(`/diffing/jobs/${id}`));
  const { labels, layers } = steerJobs.get(id).result;
  const current = want?.layer ?? layer.value;
  layer.replaceChildren(...layers.map((l) => el("option", { value: l.layer }, `block ${l.layer}`)));
  if (layers.some((l) => String(l.layer) === String(current))) layer.value = String(current);
  document.getElementById("c-steer-position").title = `the job's positions: ${labels[0]}..${labels.at(-1)}`;
  if (want) {
    document.getElementById("c-steer-position").value = want.position;
    document.getElementById("c-steer-strength").value = want.strength;
  }
}

/** The `steer` of the steered columns, or null when no ADL job is chosen. */
export function steerBody() {
  const adl = text("c-steer-adl");
  if (!adl) return null;
  const layer = text("c-steer-layer");
  return { adl, layer: layer === "" ? undefined : Number(layer), position: num("c-steer-position"),
    strength: num("c-steer-strength"), random_seed: num("c-steer-random_seed") };
}

/** `onError(exc)`: a job's record could not be loaded. */
export function setupSteer(onError) {
  document.getElementById("c-steer-adl").addEventListener("change", () => steerJobChosen().catch(onError));
}

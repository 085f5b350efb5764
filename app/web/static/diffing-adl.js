// A finished ADL job: per block the mean norms and a table of positions (count, ‖δ‖ and the logit
// lens's top tokens of δ or of either mean, promoted or suppressed); the patchscope of one chosen
// block and position at every scale, the grader's pick marked; links to the files, and a button
// that opens Compare steering with that block and position.

import { sig, visible } from "./diffing-result.js";
import { el, fill, fmt } from "./ui.js";

const LENS_TOKENS = 7; // per position row (GET /diffing/jobs/{id} keeps 10)
const SCOPE_TOKENS = 8; // per scale (the job keeps tokens_k, 20 by default)
const VECTORS = { delta: "δ = mean after − mean before", mean_before: "mean before", mean_after: "mean after" };
const SIGNS = { pos: "+ promoted", neg: "− suppressed" };
const NAMES = { delta: "δ", mean_before: "the mean before", mean_after: "the mean after" };

/** Every part of the detail; `onSteer({adl, layer, position, strength})` opens Compare. */
export function adlSections(job, full, onSteer) {
  const r = job.result;
  const scoped = r.layers[0].positions.filter((_, i) => full.layers[0].positions[i].patchscope).map((p) => p.position);
  const state = { vector: "delta", sign: "pos", layer: r.layers[0].layer, position: scoped[0] ?? r.labels[0] };
  const controls = {};
  const select = (id, label, options, key) => {
    const node = (controls[key] = el("select", { id },
      Object.entries(options).map(([value, text]) => el("option", { value }, text))));
    node.addEventListener("change", () => {
      state[key] = key === "layer" || key === "position" ? Number(node.value) : node.value;
      draw();
    });
    return el("label", { class: "adl-control" }, `${label} `, node);
  };
  const blocks = Object.fromEntries(r.layers.map((l) => [l.layer, `block ${l.layer}`]));
  const positions = Object.fromEntries(r.labels.map((p) => [p, scoped.includes(p) ? `${p} (patchscope)` : String(p)]));
  const body = el("div", { class: "adl-body" });
  const steer = el("button", { type: "button", class: "small", id: "adl-steer" }, "Steer in Compare");
  const vectorsLink = el("a", { id: "adl-vectors" }, "vectors");
  steer.addEventListener("click", () => onSteer({ adl: job.id, layer: state.layer, position: state.position,
    strength: threshold(r, state) ?? 1 }));
  const draw = () => {
    for (const [key, node] of Object.entries(controls)) node.value = String(state[key]);
    vectorsLink.href = `${job.links.vectors}?layer=${state.layer}&position=${state.position}`;
    vectorsLink.textContent = `vectors at block ${state.layer}, position ${state.position}`;
    const choose = (layer, position) => {
      Object.assign(state, { layer, position });
      draw();
    };
    fill(body, r.layers.map((layer) => layerSection(layer, state, choose)),
      scopeSection(job, full, state, scoped));
  };
  const section = el("section", { class: "diff-section adl" },
    el("p", { class: "diff-links small" }, `${r.num_samples} samples · positions ${r.labels[0]}..${r.labels.at(-1)} · `,
      el("a", { href: job.links.result, id: "adl-result" }, "result.json"), " · ",
      el("a", { href: job.links.zip, download: true, id: "adl-zip" }, "results.zip"), " · ", vectorsLink),
    el("div", { class: "adl-controls" }, select("adl-vector", "lens of", VECTORS, "vector"), select("adl-sign", "tokens", SIGNS, "sign"),
      select("adl-layer", "block", blocks, "layer"), select("adl-position", "position", positions, "position"), steer),
    body);
  draw();
  return section;
}

/** The grader's steering threshold at the chosen block and position, if it searched one. */
function threshold(r, state) {
  const layer = r.layers.find((l) => l.layer === state.layer);
  return layer?.steering?.find((s) => s.position === state.position)?.avg_threshold;
}

function tokenChips(tokens, count) {
  return el("span", { class: "lens-toks" }, tokens.slice(0, count).map((t) =>
    el("span", { class: "lens-tok", title: `${JSON.stringify(t.token)} (id ${t.token_id}) p = ${t.prob}`, "data-token-id": t.token_id },
      el("span", { class: "t" }, visible(t.token)), el("span", { class: "p" }, sig(t.prob)))));
}

function layerSection(layer, state, choose) {
  const steering = new Map((layer.steering || []).map((s) => [s.position, s.avg_threshold]));
  const head = ["position", "count", "‖δ‖", "‖δ‖ / ‖h after‖", `logit lens of ${NAMES[state.vector]}: top tokens (${SIGNS[state.sign]})`];
  if (steering.size) head.push("steering threshold");
  return el("section", { class: "adl-layer", "data-layer": layer.layer },
    el("h3", {}, `Block ${layer.layer} `, el("span", { class: "muted small" },
      `mean ‖h‖ over positions ≥ 5: before ${fmt(layer.norm_before, 3)} · after ${fmt(layer.norm_after, 3)}`)),
    el("table", { class: "summary adl-lens", "data-layer": layer.layer },
      el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, layer.positions.map((p) => {
        const current = layer.layer === state.layer && p.position === state.position;
        return el("tr", { "data-position": p.position, class: current ? "current" : null, title: "show this position's patchscope",
          onclick: () => choose(layer.layer, p.position) },
        el("td", { class: "num" }, p.position), el("td", { class: "num" }, p.count), el("td", { class: "num" }, sig(p.delta_norm)),
        el("td", { class: "num muted" }, sig(p.delta_norm / layer.norm_after)),
        el("td", {}, tokenChips(p.logit_lens[state.vector][state.sign], LENS_TOKENS)),
        steering.size ? el("td", { class: "num" }, steering.has(p.position) ? sig(steering.get(p.position)) : "–") : null);
      }))));
}

function scopeSection(job, full, state, scoped) {
  const layer = full.layers.find((l) => l.layer === state.layer);
  const entry = layer.positions.find((p) => p.position === state.position);
  const title = el("h3", {}, `Patchscope of ${NAMES[state.vector]} at block ${state.layer}, position ${state.position}`);
  if (!entry?.patchscope) {
    return el("section", { class: "diff-section", id: "adl-scope-section" }, title, el("p", { class: "muted small", id: "adl-no-scope" },
      `The patchscope ran at ${scoped.length ? `position${scoped.length > 1 ? "s" : ""} ${scoped.join(", ")}` : "no position"} (patchscope_positions).`));
  }
  const best = entry.patchscope_best?.[state.vector];
  const key = state.sign === "pos" ? "tokens" : "neg_tokens";
  return el("section", { class: "diff-section", id: "adl-scope-section" }, title,
    el("p", { class: "muted small" }, `The vector times each scale, patched into identity prompts; top tokens (${SIGNS[state.sign]}).`,
      best ? el("span", { class: "best-note", id: "adl-best" }, ` Grader's pick: scale ${best.best_scale}`,
        best.selected_tokens?.length ? `, tokens ${best.selected_tokens.map(visible).join(" ")}` : "", ".") : null),
    el("table", { class: "summary adl-scope", id: "adl-scope" },
      el("thead", {}, el("tr", {}, el("th", {}, "scale"), el("th", {}, "top tokens"))),
      el("tbody", {}, entry.patchscope[state.vector].map((s) => {
        const picked = best && Math.abs(best.best_scale - s.scale) < 1e-9;
        return el("tr", { "data-scale": s.scale, class: picked ? "best" : null },
          el("td", { class: "num" }, s.scale, picked ? el("span", { class: "badge" }, "best") : null),
          el("td", {}, tokenChips(s[key], SCOPE_TOKENS)));
      }))));
}

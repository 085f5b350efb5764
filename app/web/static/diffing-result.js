// A finished diffing job: the token orderings (top-k occurring, fraction positive, NMF topics) as
// tables with bars, the KL summary and histogram, the highest-KL samples with every analysed token
// coloured by its KL, the top likelihood-ratio windows, and links to the raw files.

import { histogramPlot } from "./plot.js";
import { appendPiece, tokenArea } from "./tokens.js";
import { el, fmt, pct } from "./ui.js";

const ROWS = 20; // ordering rows shown (the result keeps num_tokens, 100 by default)
const EXAMPLES = 5; // KL samples shown at first; "more" adds as many again
// KL of the next-token distributions (nats). Fixed edges, so a colour means the same in every job.
const KL_BUCKETS = [
  { cls: "kl0", max: 0.01, label: "< 0.01" },
  { cls: "kl1", max: 0.1, label: "0.01…0.1" },
  { cls: "kl2", max: 0.5, label: "0.1…0.5" },
  { cls: "kl3", max: 1, label: "0.5…1" },
  { cls: "kl4", max: Infinity, label: "≥ 1" },
];
const STATS = [["mean", "mean"], ["std", "std"], ["min", "min"], ["percentile_25", "25%"], ["median", "median"],
  ["percentile_75", "75%"], ["max", "max"]];

/** Three significant digits; tiny values as 7.28e-6 rather than a row of zeros. */
export function sig(x) {
  if (x === null || x === undefined) return "–";
  return x === 0 || Math.abs(x) >= 1e-3 ? Number(x).toPrecision(3) : Number(x).toExponential(2);
}

/** A token as the tables show it: spaces, newlines and tabs made visible. */
export function visible(token) {
  return token.replaceAll(" ", "␣").replaceAll("\n", "↵").replaceAll("\t", "⇥");
}

export function resultSections(job, full) {
  const r = job.result;
  return [linksLine(job), orderingsSection(r.orderings), klSection(r), examplesSection(full), windowsSection(r)];
}

function linksLine(job) {
  const r = job.result;
  const files = (kind) => `/diffing/jobs/${job.id}/files/${kind}/${encodeURIComponent(r.dataset_name)}/global_bar.png`;
  const a = (href, label, attrs = {}) => el("a", { href, ...attrs }, label);
  return el("p", { class: "diff-links small" },
    `${r.num_samples} samples · ${r.total_positions} positions · `,
    a(job.links.token_stats, "token_stats.json", { id: "diff-token-stats" }), " · ",
    a(job.links.zip, "results.zip", { id: "diff-zip", download: true }), " · ",
    a(job.links.result, "result.json"), " · plots: ",
    a(files("top_k_occurring"), "top-k occurring"), ", ", a(files("fraction_positive_diff"), "fraction positive"));
}

function orderingsSection(orderings) {
  const tables = [];
  for (const kind of ["top_k_occurring", "fraction_positive_diff", "nmf"]) {
    const group = orderings[kind];
    if (!group) continue;
    const metrics = group.type_metadata?.topic_metrics || [];
    group.orderings.forEach((o, i) => tables.push(orderingTable(kind, group, o, metrics[i])));
  }
  return el("section", { class: "diff-section" }, el("h3", {}, "Token orderings (logit diff = after − before)"),
    el("div", { class: "orderings" }, tables));
}

function orderingTable(kind, group, ordering, topic) {
  const tokens = ordering.tokens.slice(0, ROWS);
  const top = Math.max(...tokens.map((t) => Math.abs(t.ordering_value))) || 1;
  const about = topic ? ` · prevalence ${pct(topic.nmf_topic_prevalence)}, concentration ${fmt(topic.nmf_topic_concentration)}` : "";
  const title = kind === "nmf" ? `${group.display_name}: ${ordering.display_label}` : group.display_name;
  return el("table", { class: "summary ordering", "data-ordering": `${kind}/${ordering.ordering_id}` },
    el("caption", {}, el("strong", {}, title), el("span", { class: "muted" }, about)),
    el("thead", {}, el("tr", {}, ["#", "token", group.x_axis_label, "avg logit diff"].map((h) => el("th", {}, h)),
      el("th", { title: "positions where the token's logit diff is positive" }, "pos"),
      el("th", { title: "positions where it is negative" }, "neg"))),
    el("tbody", {}, tokens.map((t, i) => el("tr", {},
      el("td", { class: "num muted" }, i + 1),
      el("td", { class: "token", title: `${JSON.stringify(t.token_str)} (id ${t.token_id})` }, visible(t.token_str)),
      el("td", { class: "num value" }, el("span", { class: "bar", style: `width: ${(100 * Math.abs(t.ordering_value)) / top}%` }),
        el("span", { class: "bar-label" }, sig(t.ordering_value))),
      el("td", { class: "num" }, fmt(t.avg_logit_diff, 3)),
      el("td", { class: "num" }, t.count_positive), el("td", { class: "num" }, t.count_negative)))));
}

function klSection(r) {
  const columns = [["per token", r.kl.per_token_statistics], ["per sample (mean)", r.kl.mean_per_sample_statistics]];
  if (r.kl_reverse) {
    columns.push(["reverse, per token", r.kl_reverse.per_token_statistics],
      ["reverse, per sample", r.kl_reverse.mean_per_sample_statistics]);
  }
  const table = el("table", { class: "summary kl-stats", id: "diff-kl" },
    el("caption", {}, `KL(after ‖ before) of the next token: ${r.kl.total_tokens_processed} tokens, ${r.kl.total_sequences_processed} samples`),
    el("thead", {}, el("tr", {}, el("th", {}, ""), columns.map(([h]) => el("th", {}, h)))),
    el("tbody", {}, STATS.map(([key, label]) => el("tr", { "data-stat": key }, el("th", {}, label),
      columns.map(([, stats]) => el("td", { class: "num" }, sig(stats[key])))))));
  const { counts, edges } = r.kl.histogram;
  return el("section", { class: "diff-section kl" }, el("h3", {}, "KL divergence"),
    el("div", { class: "row" }, table, histogramPlot(counts, edges, "KL per token", "KL (nats)", sig)));
}

function klBucket(v) {
  return KL_BUCKETS.find((b) => v < b.max) || KL_BUCKETS[KL_BUCKETS.length - 1];
}

function examplesSection(full) {
  const list = el("div", { class: "examples", id: "diff-examples" });
  const more = el("button", { type: "button", class: "small" }, "more");
  const choice = el("select", { id: "diff-examples-by", "aria-label": "order the samples by" },
    el("option", { value: "kl_examples_by_max" }, "by max KL"), el("option", { value: "kl_examples_by_mean" }, "by mean KL"));
  const show = (reset) => {
    const all = full[choice.value] || [];
    if (reset) list.replaceChildren();
    all.slice(list.childElementCount, list.childElementCount + EXAMPLES).forEach((ex) => list.append(example(ex)));
    more.hidden = list.childElementCount >= all.length;
  };
  choice.addEventListener("change", () => show(true));
  more.addEventListener("click", () => show(false));
  show(true);
  return el("section", { class: "diff-section" },
    el("h3", {}, "Samples with the highest KL ", choice),
    el("div", { class: "legend-inner" }, el("span", { class: "legend-title" }, "KL after reading the token:"),
      KL_BUCKETS.map((b) => el("span", { class: `tok ${b.cls} legend-swatch` }, b.label)),
      el("span", { class: "muted" }, "uncoloured: not analysed.")),
    list, more);
}

/** One sample's tokens; the token at positions[i] carries kl[i], the KL after reading it. */
function example(ex) {
  const kl = new Map(ex.positions.map((p, i) => [p, ex.kl[i]]));
  const area = tokenArea();
  ex.tokens.forEach((token, i) => {
    const span = appendPiece(area, ex.token_ids[i], token.replaceAll("\n", "↵\n"));
    if (!kl.has(i)) return;
    const v = kl.get(i);
    span.classList.add(klBucket(v).cls);
    span.dataset.kl = String(v);
    span.tip = `token ${JSON.stringify(token)} (id ${ex.token_ids[i]})\nKL of the next token ${sig(v)} nats`;
  });
  return el("div", { class: "example sample", "data-sample": ex.sample_idx },
    el("header", {}, el("span", { class: "seed" }, `sample ${ex.sample_idx}`),
      el("span", { class: "muted" }, `score ${sig(ex.score)}`)), area);
}

function windowsSection(r) {
  const windows = r.llr_windows || [];
  return el("section", { class: "diff-section" },
    el("h3", {}, `Windows the fine-tune finds likelier (of ${r.llr_num_windows})`),
    el("table", { class: "summary windows", id: "diff-windows" },
      el("thead", {}, el("tr", {}, ["#", "log p after − log p before", "sample", "tokens", "text"].map((h) => el("th", {}, h)))),
      el("tbody", {}, windows.map((w) => el("tr", {},
        el("td", { class: "num muted" }, w.rank), el("td", { class: "num" }, fmt(w.logprob_diff, 3)),
        el("td", { class: "num" }, w.sample_idx), el("td", { class: "num muted" }, `${w.start_pos}–${w.end_pos}`),
        el("td", { class: "window-text" }, w.text))))));
}

// Hand-written SVG charts: the experiment's hit rate against alpha with 95% intervals, the
// per-task loss curves of a weight-diff job, a diffing job's KL histogram. No library: a few axes, marks and labels.

const NS = "http://www.w3.org/2000/svg";
// Series colours with at least 3:1 contrast on white (marks) and distinct for common colour blindness.
export const SERIES = ["#1f5fa8", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#be123c", "#0f766e", "#475569"];

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`. */
function niceMax(max) {
  if (!(max > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(max));
  return [1, 2, 5, 10].map((m) => m * p).find((v) => v >= max);
}

function frame(width, height, pad, title) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart" });
  root.append(svg("title", {}, title));
  root.append(svg("rect", { x: pad.l, y: pad.t, width: width - pad.l - pad.r, height: height - pad.t - pad.b, class: "plot-bg" }));
  return root;
}

function yAxis(root, pad, width, y, top, format) {
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    root.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: "gridline" }));
    root.append(svg("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, format(v)));
  }
}

/** The series a summary row belongs to: its label without the alpha ("LDA" for plain alphas). */
export function arm(row) {
  const head = row.condition.slice(0, row.condition.lastIndexOf("alpha=")).trim();
  return head || "LDA";
}

/**
 * One series per arm and detector, in summary order, points sorted by alpha; rows without samples
 * left out (as lda.experiments.report.plot_series, which draws report.png).
 */
export function rateSeries(summary) {
  const series = new Map();
  for (const r of summary) {
    const key = `${arm(r)}\u0000${r.detector}`;
    if (!series.has(key)) series.set(key, { arm: arm(r), detector: r.detector, control: !!r.control, rows: [] });
    if (r.total) series.get(key).rows.push(r);
  }
  const all = [...series.values()];
  for (const s of all) s.rows.sort((a, b) => a.alpha - b.alpha);
  return all;
}

/**
 * Hit rate against alpha (a numeric axis), one line per arm and detector with each point's Wilson
 * 95% interval as a bar; the null control dashed, so it never reads as the next alpha.
 * `summary` rows: {condition, alpha, control, detector, rate, ci95: [lo, hi], hits, total}.
 */
export function ratePlot(summary, title) {
  const series = rateSeries(summary);
  const alphas = [...new Set(summary.map((r) => r.alpha))].sort((a, b) => a - b);
  const lo = alphas[0] ?? 0;
  const span = alphas.length > 1 ? alphas[alphas.length - 1] - lo : 1;
  const width = Math.max(420, 60 * alphas.length + 160);
  const legendRows = Math.ceil(series.length / 3);
  const height = 260 + 18 * legendRows;
  const pad = { l: 56, r: 24, t: 28, b: 48 + 18 * legendRows };
  const top = niceMax(Math.max(0.01, ...summary.map((r) => r.ci95[1] ?? 0)));
  const y = (v) => pad.t + (height - pad.t - pad.b) * (1 - v / top);
  const inner = width - pad.l - pad.r;
  const x = (a) => pad.l + inner * (0.06 + 0.88 * ((a - lo) / span));
  const root = frame(width, height, pad, title);
  yAxis(root, pad, width, y, top, (v) => `${+(100 * v).toFixed(1)}%`);
  const mid = pad.t + (height - pad.t - pad.b) / 2;
  root.append(svg("text", { x: 14, y: mid, class: "axis-label", transform: `rotate(-90 14 ${mid})`, "text-anchor": "middle" }, "rate"));
  root.append(svg("text", { x: pad.l, y: 16, class: "chart-title" }, title));
  for (const a of alphas) {
    root.append(svg("text", { x: x(a), y: height - pad.b + 16, "text-anchor": "middle", class: "tick" }, `${a}`));
  }
  root.append(svg("text", { x: pad.l + inner / 2, y: height - pad.b + 32, "text-anchor": "middle", class: "axis-label" }, "alpha"));
  series.forEach((s, k) => {
    const colour = SERIES[k % SERIES.length];
    const nudge = (k - (series.length - 1) / 2) * 6; // px: equal rates at one alpha stay apart
    const px = (r) => x(r.alpha) + nudge;
    const dash = s.control ? { "stroke-dasharray": "6 4" } : {};
    if (s.rows.length > 1) {
      const points = s.rows.map((r) => `${px(r).toFixed(1)},${y(r.rate).toFixed(1)}`).join(" ");
      root.append(svg("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2, class: "rate-line",
        "data-arm": s.arm, "data-detector": s.detector, ...dash }));
    }
    for (const r of s.rows) {
      const cx = px(r);
      const g = svg("g", { class: "rate-mark", "data-condition": r.condition, "data-detector": s.detector });
      g.append(svg("title", {}, `${r.condition} · ${s.detector}: ${r.hits}/${r.total}, 95% [${pctText(r.ci95[0])}, ${pctText(r.ci95[1])}]`));
      g.append(svg("line", { x1: cx, x2: cx, y1: y(r.ci95[0]), y2: y(r.ci95[1]), stroke: colour, class: "interval" }));
      for (const v of r.ci95) g.append(svg("line", { x1: cx - 5, x2: cx + 5, y1: y(v), y2: y(v), stroke: colour, class: "interval" }));
      g.append(s.control ? svg("rect", { x: cx - 4, y: y(r.rate) - 4, width: 8, height: 8, fill: colour })
        : svg("circle", { cx, cy: y(r.rate), r: 4.5, fill: colour }));
      root.append(g);
    }
    const lx = pad.l + 8 + (inner / 3) * (k % 3);
    const ly = height - 12 - 18 * (legendRows - 1 - Math.floor(k / 3));
    root.append(svg("text", { x: lx, y: ly, fill: colour, class: "legend-text" }, `${s.control ? "- -" : "—"} ${s.arm} · ${s.detector}`));
  });
  return root;
}

function pctText(v) {
  return `${(100 * v).toFixed(1)}%`;
}

/** Loss per optimizer step, one line per task. `losses[t]` is task t's mean loss at each step. */
export function lossPlot(losses, names, title) {
  const width = 520;
  const height = 260;
  const pad = { l: 56, r: 16, t: 28, b: 48 };
  const steps = Math.max(2, ...losses.map((l) => l.length));
  const top = niceMax(Math.max(0, ...losses.flat()));
  const x = (i) => pad.l + ((width - pad.l - pad.r) * i) / (steps - 1);
  const y = (v) => pad.t + (height - pad.t - pad.b) * (1 - v / top);
  const root = frame(width, height, pad, title);
  yAxis(root, pad, width, y, top, (v) => v.toFixed(top < 1 ? 2 : 1));
  const mid = pad.t + (height - pad.t - pad.b) / 2;
  root.append(svg("text", { x: 14, y: mid, class: "axis-label", transform: `rotate(-90 14 ${mid})`, "text-anchor": "middle" }, "loss"));
  root.append(svg("text", { x: pad.l, y: 16, class: "chart-title" }, title));
  root.append(svg("text", { x: width - pad.r, y: height - pad.b + 18, "text-anchor": "end", class: "tick" }, `step ${steps}`));
  root.append(svg("text", { x: pad.l, y: height - pad.b + 18, class: "tick" }, "step 1"));
  losses.forEach((series, t) => {
    const colour = SERIES[t % SERIES.length];
    const points = series.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const line = svg("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2, class: "loss-line", "data-task": names[t] });
    line.append(svg("title", {}, `${names[t]}: ${series.length ? series[series.length - 1].toFixed(4) : "–"} at step ${series.length}`));
    root.append(line);
    root.append(svg("text", { x: pad.l + 8 + 110 * t, y: height - 10, fill: colour, class: "legend-text" }, `— ${names[t]}`));
  });
  return root;
}

/**
 * A histogram from counts per bin and the bins' edges (`edges.length === counts.length + 1`), on a
 * log scale: KL per token is mostly near zero, and a linear axis would hide the tail that matters.
 */
export function histogramPlot(counts, edges, title, xLabel, format = (v) => v.toPrecision(3)) {
  const width = 520;
  const height = 240;
  const pad = { l: 56, r: 16, t: 28, b: 48 };
  const top = Math.max(1, ...counts);
  const decades = Math.ceil(Math.log10(top + 1));
  const scale = (v) => Math.log10(v + 1) / decades; // 0 -> 0, 10^decades - 1 -> 1
  const y = (v) => pad.t + (height - pad.t - pad.b) * (1 - scale(v));
  const slot = (width - pad.l - pad.r) / Math.max(1, counts.length);
  const root = frame(width, height, pad, title);
  for (let d = 0; d <= decades; d++) {
    const v = 10 ** d - 1; // gridlines at 0, 9, 99, ...: labelled as the decade they start
    root.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: "gridline" }));
    root.append(svg("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, d ? `${10 ** d}` : "0"));
  }
  counts.forEach((n, i) => {
    const bar = svg("rect", { x: pad.l + slot * i + 0.5, width: Math.max(1, slot - 1), y: y(n), height: y(0) - y(n),
      class: "hist-bar", "data-count": n });
    bar.append(svg("title", {}, `${format(edges[i])} – ${format(edges[i + 1])}: ${n}`));
    root.append(bar);
  });
  const mid = pad.t + (height - pad.t - pad.b) / 2;
  root.append(svg("text", { x: 14, y: mid, class: "axis-label", transform: `rotate(-90 14 ${mid})`, "text-anchor": "middle" }, "count (log)"));
  root.append(svg("text", { x: pad.l, y: 16, class: "chart-title" }, title));
  root.append(svg("text", { x: pad.l, y: height - pad.b + 16, class: "tick" }, format(edges[0])));
  root.append(svg("text", { x: width - pad.r, y: height - pad.b + 16, "text-anchor": "end", class: "tick" }, format(edges[edges.length - 1])));
  root.append(svg("text", { x: pad.l + (width - pad.l - pad.r) / 2, y: height - 10, "text-anchor": "middle", class: "axis-label" }, xLabel));
  return root;
}

// Tokens as spans: streamed in as plain text, coloured once the row's `details` arrive by how far
// amplification moved each token (logprob_amplified - logprob_after), with a hover / focus tooltip
// and a search highlight. Shared by Compare and the experiment hits.

import { el, fmt } from "./ui.js";

// Buckets of delta = logprob_amplified - logprob_after (nats). Fixed edges rather than a scale
// fitted per answer, so the same colour means the same push in every column and every view.
export const BUCKETS = [
  { cls: "d-3", max: -2, label: "≤ −2" },
  { cls: "d-2", max: -1, label: "−2…−1" },
  { cls: "d-1", max: -0.25, label: "−1…−¼" },
  { cls: "d0", max: 0.25, label: "±¼" },
  { cls: "d1", max: 1, label: "¼…1" },
  { cls: "d2", max: 2, label: "1…2" },
  { cls: "d3", max: Infinity, label: "≥ 2" },
];

export function bucket(delta) {
  return BUCKETS.find((b) => delta <= b.max) || BUCKETS[BUCKETS.length - 1];
}

export function legend() {
  return el(
    "div",
    { class: "legend-inner" },
    el("span", { class: "legend-title" }, "log p(amplified) − log p(after):"),
    BUCKETS.map((b) => el("span", { class: `tok ${b.cls} legend-swatch` }, b.label)),
    el("span", { class: "muted" }, "blue: amplification pushed the token down, orange: up."),
  );
}

/** A sample's token area: one focus stop, arrow keys move between tokens (roving tabindex). */
export function tokenArea() {
  const area = el("div", { class: "tokens", role: "group", "aria-label": "generated tokens" });
  area.addEventListener("keydown", moveFocus);
  return area;
}

/** Append streamed text; `tokenId` null is a tail the stop check held back. */
export function appendPiece(area, tokenId, text) {
  const span = el("span", { class: "tok", tabindex: area.childElementCount ? "-1" : "0" }, text);
  if (tokenId !== null && tokenId !== undefined) span.dataset.tokenId = tokenId;
  area.append(span);
  return span;
}

/**
 * Colour the streamed spans with the row's details. A streamed piece carries the text its token made
 * safe to show, which can include earlier tokens whose text was empty (a partial character), so a
 * piece covers every detail up to and including its own token id.
 */
export function applyDetails(area, details) {
  let j = 0;
  for (const span of area.querySelectorAll(".tok")) {
    if (span.dataset.tokenId === undefined) continue;
    const id = Number(span.dataset.tokenId);
    let k = j;
    while (k < details.length && details[k].token_id !== id) k++;
    if (k >= details.length) break; // out of step: leave the rest plain rather than guess
    colour(span, details.slice(j, k + 1));
    j = k + 1;
  }
}

/** Spans from details alone (no stream): each token's own text, as the tokenizer spells it. */
export function fromDetails(area, details, texts) {
  details.forEach((d, i) => colour(appendPiece(area, d.token_id, texts ? texts[i] : d.token), [d]));
}

function colour(span, covered) {
  const d = covered[covered.length - 1];
  const delta = d.logprob_amplified - d.logprob_after;
  span.classList.add(bucket(delta).cls);
  span.dataset.delta = delta.toFixed(3);
  span.info = covered;
}

function tipText(covered) {
  return covered
    .map((d) => {
      const delta = d.logprob_amplified - d.logprob_after;
      return [
        `token ${JSON.stringify(d.token)} (id ${d.token_id})`,
        `before ${fmt(d.logprob_before, 3)}`,
        `after ${fmt(d.logprob_after, 3)}`,
        `amplified ${fmt(d.logprob_amplified, 3)}`,
        `Δ ${delta >= 0 ? "+" : ""}${fmt(delta, 3)}`,
      ].join("\n");
    })
    .join("\n\n");
}

// A span's tip: its logprob details (`info`), or a ready text (`tip`, e.g. a diffing job's KL).
function showTip(span) {
  if (!span.info && !span.tip) return;
  const tip = document.getElementById("tooltip");
  tip.textContent = span.tip ?? tipText(span.info);
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  // Below the token, kept inside the window.
  const left = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8);
  tip.style.left = `${Math.max(4, left) + window.scrollX}px`;
  tip.style.top = `${r.bottom + 6 + window.scrollY}px`;
  span.setAttribute("aria-describedby", "tooltip");
}

function hideTip(span) {
  document.getElementById("tooltip").hidden = true;
  span.removeAttribute("aria-describedby");
}

/** Hover and focus show a token's logprobs (or its `tip`); set up once on the page (events bubble from spans). */
export function setupTooltip() {
  for (const [show, hide] of [["mouseover", "mouseout"], ["focusin", "focusout"]]) {
    document.addEventListener(show, (e) => e.target.classList?.contains("tok") && showTip(e.target));
    document.addEventListener(hide, (e) => e.target.classList?.contains("tok") && hideTip(e.target));
  }
}

function moveFocus(event) {
  const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
  if (!step || !event.target.classList.contains("tok")) return;
  const spans = [...event.currentTarget.querySelectorAll(".tok")];
  const next = spans[spans.indexOf(event.target) + step];
  if (!next) return;
  event.preventDefault();
  event.target.tabIndex = -1;
  next.tabIndex = 0;
  next.focus();
}

/** Mark every span overlapping a case-insensitive match of `needle`; returns the areas that match. */
export function highlight(areas, needle) {
  let matched = 0;
  for (const area of areas) {
    const spans = [...area.querySelectorAll(".tok")];
    for (const s of spans) s.classList.remove("mark");
    if (!needle) continue;
    const starts = [];
    let pos = 0;
    for (const s of spans) {
      starts.push(pos);
      pos += s.textContent.length;
    }
    const hay = spans.map((s) => s.textContent).join("").toLowerCase();
    const want = needle.toLowerCase();
    let found = false;
    for (let at = hay.indexOf(want); at >= 0; at = hay.indexOf(want, at + 1)) {
      found = true;
      spans.forEach((s, i) => {
        const end = starts[i] + s.textContent.length;
        if (starts[i] < at + want.length && end > at) s.classList.add("mark");
      });
    }
    matched += found ? 1 : 0;
  }
  return matched;
}

// Small DOM helpers shared by the views: element building, field errors, the offline banner.

import { ApiError, ConnectionError } from "./api.js";

/** el("div", {class: "x", onclick: f}, child, "text") -> an element; null children are skipped. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Replace a node's children, skipping null / false (conditional parts) like `el` does. */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

export function num(id) {
  const v = document.getElementById(id).value.trim();
  return v === "" ? undefined : Number(v);
}

export function text(id) {
  return document.getElementById(id).value;
}

/** "0, 1, 2.5" -> [0, 1, 2.5]; anything that is not a number goes to the server as is (it says why). */
export function numberList(value) {
  return value.split(/[\s,]+/).filter(Boolean).map((s) => (Number.isNaN(Number(s)) ? s : Number(s)));
}

export function clearErrors(form) {
  for (const p of form.querySelectorAll(".field-error")) p.remove();
  for (const f of form.querySelectorAll("[aria-invalid]")) f.removeAttribute("aria-invalid");
  const general = form.querySelector(".form-error");
  general.hidden = true;
  general.textContent = "";
}

/**
 * Show an error at the field the server named (`param`, e.g. "temperature" or "alphas.0"), or at the
 * form when it named none we show. Connection errors go to the offline banner instead.
 */
export function showError(form, exc, retry) {
  if (exc.name === "AbortError") return;
  if (exc instanceof ConnectionError) {
    offline(exc.message, retry);
    return;
  }
  const message = exc instanceof ApiError ? exc.message : `unexpected: ${exc.message}`;
  const field = fieldFor(form, exc.param, message);
  if (field) {
    const input = field.querySelector("input, textarea, select");
    const id = `${input.id}-error`;
    field.querySelector(".field-error")?.remove();
    field.append(el("p", { class: "field-error", id, role: "alert", text: message }));
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", id);
    return;
  }
  const general = form.querySelector(".form-error");
  general.textContent = message;
  general.hidden = false;
}

function fieldFor(form, param, message) {
  // `param` is the first field the server named: the form's field for it, or for the nearest path
  // above it ("steer.position" has its own field; "alphas.0" is the alphas field's).
  // Some 422s (the library's own checks) name the field only in the message ("steps: ...").
  const path = param || message.match(/^([a-z_][\w.[\]]*):/)?.[1] || message.match(/^([a-z_]+)[.[]/)?.[1] || "";
  for (let name = path; name; name = name.slice(0, Math.max(name.lastIndexOf("."), name.lastIndexOf("["), 0))) {
    const field = form.querySelector(`.field[data-param="${CSS.escape(name)}"]:not([hidden])`);
    if (field) return field;
  }
  return null;
}

let pendingRetry = null;

/** The banner with a Retry button: the page never goes blank because the server went away. */
export function offline(message, retry) {
  document.getElementById("offline-text").textContent = `Connection lost: ${message}.`;
  document.getElementById("offline").hidden = false;
  pendingRetry = retry;
}

export function online() {
  document.getElementById("offline").hidden = true;
}

export function setupRetry() {
  document.getElementById("retry").addEventListener("click", () => {
    online();
    const again = pendingRetry;
    pendingRetry = null;
    if (again) again();
  });
}

export function fmt(x, digits = 2) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

export function pct(x) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`;
}

/** A progress bar with its percentage as a tooltip. */
export function progressBar(done, total, label) {
  return el("progress", { max: total || 1, value: done, "aria-label": label, title: pct(total ? done / total : 0) });
}

/**
 * An entry of a side list (experiments, weight-diff jobs): a button with the title, the status,
 * a progress bar and a count, pressed when it is the one shown.
 */
export function listEntry({ id, title, status, done, total, count, current, onSelect }) {
  return el("li", {},
    el("button", { type: "button", class: `item${current ? " current" : ""}`, "aria-pressed": String(current),
      "data-id": id, onclick: onSelect },
      el("span", { class: "item-title" }, title),
      el("span", { class: `status s-${status}` }, status),
      progressBar(done, total, `${title} progress`),
      el("span", { class: "muted small" }, count)));
}

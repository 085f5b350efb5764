// The page's only way to the server: the public HTTP API, same origin, JSON in and out.
// Handles the API key (asked once on a 401, kept in localStorage), the error body
// {"error": {"message", "type", "param"?}}, Server-Sent Events, and a dropped connection.

const KEY_STORE = "model-diff-api-key";

/** An answer with an error status: the server's message, type and the field it names. */
export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || "http_error";
    this.param = err.param || null;
  }
}

/** The request never got an answer (server down, network gone): the page offers a retry. */
export class ConnectionError extends Error {}

export function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

// One dialog for every request that hits a 401 at the same time: they all wait on it.
let asking = null;

function askForKey() {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      asking = null;
      const key = dialog.returnValue === "ok" ? input.value.trim() : "";
      if (key) localStorage.setItem(KEY_STORE, key);
      resolve(Boolean(key));
    }, { once: true });
  });
  dialog.showModal();
  return asking;
}

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const key = apiKey();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function send(method, path, body, signal) {
  try {
    return await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined || typeof body === "string" ? body : JSON.stringify(body), // a string: JSON already
      signal,
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ConnectionError(`cannot reach the server (${exc.message})`);
  }
}

/** fetch with the key; on a 401 ask for the key once and try again. */
async function authed(method, path, body, signal) {
  let resp = await send(method, path, body, signal);
  if (resp.status === 401 && (await askForKey())) resp = await send(method, path, body, signal);
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  return resp;
}

export async function getJSON(path, signal) {
  return (await authed("GET", path, undefined, signal)).json();
}

export async function postJSON(path, body, signal) {
  return (await authed("POST", path, body, signal)).json();
}

export async function del(path) {
  return (await authed("DELETE", path)).json();
}

/**
 * POST a `stream: true` body and call `onEvent(name, data)` per SSE event as it arrives.
 * An `error` event (the stream had already started, so it is in-band) is thrown as an ApiError.
 */
export async function stream(path, body, onEvent, signal) {
  const resp = await authed("POST", path, { ...body, stream: true }, signal);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (event.name === "error") throw new ApiError(500, event.data);
        onEvent(event.name, event.data);
      }
    }
  } catch (exc) {
    if (exc instanceof ApiError || exc.name === "AbortError") throw exc;
    throw new ConnectionError(`the stream was cut (${exc.message})`);
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return { name, data: JSON.parse(data.join("\n")) };
}

/** A curl command that sends `body` to `path` here, with the key as an environment variable. */
export function curlCommand(path, body) {
  const quote = (s) => `'${s.replaceAll("'", "'\\''")}'`;
  const parts = [`curl -s ${quote(location.origin + path)}`, "-H 'content-type: application/json'"];
  if (apiKey()) parts.push('-H "Authorization: Bearer $API_KEY"');
  parts.push(`-d ${quote(JSON.stringify(body))}`);
  return parts.join(" ");
}

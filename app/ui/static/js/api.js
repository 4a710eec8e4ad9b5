// Calls to the API on this same host. The key (when the server has API_KEYS) lives in
// sessionStorage and goes out as `Authorization: Bearer <key>`, never in a URL.

const KEY_STORAGE = "imgclf.apiKey";

export const FINAL_STATUSES = new Set(["succeeded", "failed", "cancelled"]);

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** An API answer that was not 2xx: `status` and the body's `detail` (a string, or FastAPI's list). */
export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${formatDetail(detail)}`);
    this.status = status;
    this.detail = detail;
  }
}

/** FastAPI's detail as one readable line. */
export function formatDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => (e && e.msg ? `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}` : String(e)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

async function readBody(res) {
  const type = res.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      return await res.json();
    } catch {
      return null;
    }
  }
  return await res.text();
}

/**
 * fetch() a path of this API. `json` sends a JSON body, `form` a FormData.
 * Returns the decoded JSON body; throws ApiError (HTTP error) or the network error.
 */
export async function api(path, { method = "GET", json, form, signal, headers = {} } = {}) {
  const init = { method, signal, headers: { ...authHeaders(), ...headers } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const res = await fetch(path, init);
  const body = await readBody(res);
  if (res.status === 401) window.dispatchEvent(new CustomEvent("imgclf:unauthorized"));
  if (!res.ok) throw new ApiError(res.status, body && typeof body === "object" ? body.detail : body || res.statusText);
  return body;
}

/** An image of the API (needs the key, so no plain <img src>) as an object URL; revoke it when done. */
export async function apiImageUrl(path, signal) {
  const res = await fetch(path, { headers: authHeaders(), signal });
  if (!res.ok) throw new ApiError(res.status, (await readBody(res))?.detail ?? res.statusText);
  return URL.createObjectURL(await res.blob());
}

let openapiPromise = null;

/** The server's OpenAPI document (cached): job forms and the optional endpoints come from it. */
export function openapi() {
  if (!openapiPromise) {
    openapiPromise = fetch("/openapi.json").then((res) => {
      if (!res.ok) throw new ApiError(res.status, res.statusText);
      return res.json();
    });
    openapiPromise.catch(() => (openapiPromise = null));
  }
  return openapiPromise;
}

/** True when the server has `method path` (e.g. "get", "/jobs/{job_id}/events"). */
export async function hasEndpoint(method, template) {
  const doc = await openapi();
  return Boolean(doc.paths?.[template]?.[method]);
}

/** Resolve a local `$ref` of the OpenAPI document. */
export function resolveRef(doc, node) {
  let seen = 0;
  while (node && node.$ref && seen++ < 20) {
    node = node.$ref
      .replace(/^#\//, "")
      .split("/")
      .reduce((acc, part) => acc?.[part.replace(/~1/g, "/").replace(/~0/g, "~")], doc);
  }
  return node;
}

let configPromise = null;

/** /ui/config.json: whether the server wants an API key. */
export function uiConfig() {
  if (!configPromise) {
    configPromise = fetch("/ui/config.json")
      .then((res) => (res.ok ? res.json() : { auth_required: false }))
      .catch(() => ({ auth_required: false }));
  }
  return configPromise;
}

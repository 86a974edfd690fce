// The manager's REST API, same origin, with the sign-in session: the dfz_session cookie is HttpOnly and
// SameSite=Strict, so this script never sees it and no other site's page can send it. Bodies are JSON.

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** The readable text of an error answer: FastAPI's detail is a string, or a list of field errors. */
function explain(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`)
      .join("; ");
  }
  return `HTTP ${status}`;
}

let onSignedOut = () => {};
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

export async function call(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let answer;
  try {
    answer = await fetch(API + path, init);
  } catch (e) {
    throw new ApiError(0, `the manager did not answer (${e.message})`);
  }
  const text = await answer.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = null;
    }
  }
  if (!answer.ok) {
    if (answer.status === 401 && path !== "/sessions") onSignedOut();
    throw new ApiError(answer.status, explain(answer.status, parsed));
  }
  return parsed;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
export const del = (path) => call("DELETE", path);
export const patch = (path, body) => call("PATCH", path, body);

/** Every row of a list (pages of 1000), up to `limit`. */
export async function all(path, limit = 5000) {
  const rows = [];
  const sep = path.includes("?") ? "&" : "?";
  for (let page = 1; rows.length < limit; page += 1) {
    const got = await get(`${path}${sep}per_page=1000&page=${page}`);
    rows.push(...got.items);
    if (rows.length >= got.total || !got.items.length) break;
  }
  return rows;
}

/** The newest `count` rows of a list (lists are in id order). */
export async function newest(path, count = 20) {
  const sep = path.includes("?") ? "&" : "?";
  const first = await get(`${path}${sep}per_page=${count}&page=1`);
  const last = Math.max(1, Math.ceil(first.total / count));
  const page = last === 1 ? first : await get(`${path}${sep}per_page=${count}&page=${last}`);
  let items = page.items;
  if (last > 1 && items.length < count) {
    const before = await get(`${path}${sep}per_page=${count}&page=${last - 1}`);
    items = before.items.concat(items).slice(-count);
  }
  return items.slice().reverse();
}

/** Whether permissions (a role's, or a token's scopes) allow an action on a group, as the manager decides. */
export function allows(granted, group, action) {
  if (!granted) return true;
  return granted.includes("*") || granted.includes(group) || granted.includes(`${group}:${action}`);
}

export function may(me, group, action) {
  return Boolean(me) && allows(me.permissions, group, action) && allows(me.scopes, group, action);
}

// A line chart of bytes/s from peers and from the origin, drawn in SVG (no library): the swarm view and the
// overview's throughput both use it. Samples are {peers, origin} in bytes/s (null: not known yet).

import { clear, h, rate, s } from "./dom.js";

export const HISTORY = 60; // samples kept (a minute at one a second)
const W = 640;
const H = 180;
const PAD = 76;

export function drawRates(el, samples) {
  const top = Math.max(1, ...samples.map((p) => Math.max(p.peers || 0, p.origin || 0)));
  const x = (i) => PAD + ((W - PAD - 8) * i) / Math.max(1, HISTORY - 1);
  const y = (v) => H - 20 - ((H - 30) * (v || 0)) / top;
  const line = (key) => samples.map((p, i) => `${x(i + HISTORY - samples.length).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
  const last = samples[samples.length - 1] || {};
  const shown = (v) => (v === null || v === undefined ? "…" : rate(v));
  el.dataset.samples = String(samples.length);
  clear(el).append(
    s(
      "svg",
      { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "bytes per second from peers and from the origin" },
      s("line", { x1: PAD, y1: H - 20, x2: W - 8, y2: H - 20, class: "axis" }),
      s("line", { x1: PAD, y1: 10, x2: PAD, y2: H - 20, class: "axis" }),
      s("text", { x: PAD - 4, y: 16, class: "label end" }, rate(top)),
      s("text", { x: PAD - 4, y: H - 20, class: "label end" }, "0"),
      s("text", { x: W - 8, y: H - 4, class: "label end" }, `last ${HISTORY} s`),
      s("polyline", { points: line("peers"), class: "series peers" }),
      s("polyline", { points: line("origin"), class: "series origin" }),
    ),
    h(
      "p",
      { class: "legend" },
      h("span", { class: "key peers" }, "from peers "),
      h("b", { class: "rate-peers" }, shown(last.peers)),
      "  ",
      h("span", { class: "key origin" }, "from the origin "),
      h("b", { class: "rate-origin" }, shown(last.origin)),
    ),
  );
}

/** A websocket to the manager's live endpoint (/api/v1/ws/swarm), authenticated by the session cookie. */
export function liveSocket(first, onMessage, onClose) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/api/v1/ws/swarm`);
  socket.addEventListener("open", () => socket.send(JSON.stringify(first)));
  socket.addEventListener("message", (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      msg = { type: "error", status: 0, detail: "the manager sent something that is not JSON" };
    }
    onMessage(msg);
  });
  socket.addEventListener("close", onClose);
  return socket;
}

// The live swarm of one task: the manager's websocket (/api/v1/ws/swarm, protocol.md §17.11) pushes the
// task's swarm as its scheduler sees it about every second; this draws the tree (each peer under the parent
// the scheduler gave it first) and a chart of the bytes/s the swarm gets from peers and from the origin.
// The socket is authenticated by the session cookie the browser sends with the handshake: no secret in the
// URL or in a message.

import { HISTORY, drawRates, liveSocket } from "./chart.js";
import { bytes, clear, h, rate } from "./dom.js";

export class SwarmView {
  constructor(root, taskId) {
    this.samples = [];
    this.socket = null;
    this.closed = false;
    this.input = h("input", { id: "swarm-task", placeholder: "task id: 64 hex digits", size: 66, value: taskId || "" });
    const watch = h("button", { type: "submit", id: "swarm-watch" }, "Watch");
    const form = h("form", { class: "card row", id: "swarm-form" }, h("label", {}, "Task", this.input), watch);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const id = this.input.value.trim();
      if (location.hash !== `#/swarm/${id}`) location.hash = `#/swarm/${id}`;
      else this.watch(id);
    });
    this.status = h("p", { id: "swarm-status", class: "muted" }, "Give a task id (Tasks finds it from a URL).");
    this.facts = h("div", { id: "swarm-facts" });
    this.chart = h("div", { id: "swarm-chart", class: "card chart" });
    this.tree = h("div", { id: "swarm-tree", class: "card" });
    root.append(h("h1", {}, "Live swarm"), form, this.status, this.facts, h("h2", {}, "Throughput"), this.chart, h("h2", {}, "Swarm tree"), this.tree);
    if (taskId) this.watch(taskId);
  }

  close() {
    this.closed = true;
    if (this.socket) this.socket.close(1000, "view closed");
    this.socket = null;
  }

  setStatus(text, kind = "muted") {
    this.status.className = kind;
    this.status.textContent = text;
  }

  watch(taskId) {
    if (!/^[0-9a-f]{64}$/.test(taskId)) {
      this.setStatus("A task id is 64 lowercase hex digits.", "error");
      return;
    }
    if (this.socket) this.socket.close(1000, "another task");
    this.samples = [];
    this.updates = 0;
    this.setStatus("Connecting…");
    const socket = liveSocket(
      { type: "watch", task_id: taskId, interval: 1 },
      (msg) => {
        if (socket === this.socket) this.onMessage(msg);
      },
      (ev) => {
        if (socket !== this.socket || this.closed) return;
        this.setStatus(`The live connection closed (${ev.code}${ev.reason ? `: ${ev.reason}` : ""}). Watch again to reconnect.`, "error");
      },
    );
    this.socket = socket;
  }

  onMessage(msg) {
    if (msg.type === "swarm") {
      this.updates += 1;
      this.setStatus(`Live from scheduler ${msg.scheduler.hostname} · update ${this.updates} at ${new Date(msg.at).toLocaleTimeString()}`);
      this.status.dataset.updates = String(this.updates);
      this.samples.push({ at: msg.at, peers: msg.rates.from_peers, origin: msg.rates.from_origin });
      if (this.samples.length > HISTORY) this.samples.shift();
      this.drawFacts(msg);
      this.drawChart();
      this.drawTree(msg);
    } else if (msg.type === "unavailable") {
      this.setStatus(`No swarm to show now: ${msg.detail}`, "notice");
    } else if (msg.type === "error") {
      this.setStatus(`${msg.detail} (${msg.status})`, "error");
    }
  }

  drawFacts(msg) {
    const t = msg.task;
    const progress = t.piece_count && t.peers ? (100 * t.finished_pieces) / (t.piece_count * t.peers) : null;
    clear(this.facts).append(
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "URL"),
        h("dd", { class: "url" }, t.url),
        h("dt", {}, "task"),
        h("dd", {}, t.state, " · ", t.content_length === null ? "size unknown" : bytes(t.content_length), t.piece_count ? ` in ${t.piece_count} pieces` : ""),
        h("dt", {}, "peers"),
        h("dd", { id: "swarm-peer-count" }, `${t.peers} (${t.running} downloading, ${t.back_to_source} at the origin, ${t.succeeded} done, ${t.failed} failed)`),
        h("dt", {}, "progress"),
        h("dd", {}, progress === null ? "?" : `${progress.toFixed(1)} % of all peers' pieces`),
        h("dt", {}, "bytes"),
        h("dd", {}, `${bytes(t.bytes_from_peers)} from peers · ${bytes(t.bytes_from_origin)} from the origin`),
        msg.truncated ? [h("dt", {}, "note"), h("dd", { class: "notice" }, "more peers than one snapshot holds: some are not shown")] : [],
      ),
    );
  }

  drawChart() {
    drawRates(this.chart, this.samples);
  }

  drawTree(msg) {
    const peers = new Map(msg.peers.map((p) => [p.peer_id, p]));
    const children = new Map();
    const roots = [];
    for (const p of msg.peers) {
      const parent = p.parents.find((id) => peers.has(id));
      if (parent === undefined) roots.push(p);
      else {
        if (!children.has(parent)) children.set(parent, []);
        children.get(parent).push(p);
      }
    }
    const pieces = msg.task.piece_count;
    const shown = new Set();
    const node = (p) => {
      shown.add(p.peer_id);
      const bar = h("span", { class: "bar" });
      bar.style.width = pieces ? `${Math.min(100, (100 * p.finished_pieces) / pieces).toFixed(1)}%` : "0";
      const others = p.parents.slice(1).filter((id) => peers.has(id)).map((id) => peers.get(id).hostname);
      const kids = (children.get(p.peer_id) || []).filter((c) => !shown.has(c.peer_id));
      return h(
        "li",
        { class: ["peer", `state-${p.state}`], "data-peer": p.peer_id },
        h("span", { class: "host" }, p.hostname),
        p.host_type === "seed" ? h("span", { class: "tag" }, "seed") : "",
        h("span", { class: ["badge", `state-${p.state}`] }, p.state),
        h("span", { class: "progress", title: `${p.finished_pieces}/${pieces ?? "?"} pieces` }, bar),
        h("span", { class: "muted" }, `${p.finished_pieces}/${pieces ?? "?"}`),
        p.rate === null ? "" : h("span", { class: "rate" }, rate(p.rate)),
        p.children ? h("span", { class: "muted" }, `${p.children} child(ren)`) : "",
        others.length ? h("span", { class: "muted" }, `also from ${others.join(", ")}`) : "",
        kids.length ? h("ul", {}, kids.map(node)) : "",
      );
    };
    const items = roots.map(node);
    for (const p of msg.peers) if (!shown.has(p.peer_id)) items.push(node(p)); // a cycle has no root: show it anyway
    clear(this.tree).append(msg.peers.length ? h("ul", { class: "tree" }, items) : h("p", { class: "empty" }, "no peers"));
  }
}

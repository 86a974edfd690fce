// The dfz manager's console: one page, views chosen by the URL's fragment (#/overview, #/tasks, #/jobs,
// #/jobs/ID, #/swarm/TASK_ID, #/admin, #/tokens). Everything shown comes from the REST API of this origin;
// what a user may do is decided by the manager on every request, the page only hides what would be refused.

import { ApiError, all, del, get, may, newest, patch, post, whenSignedOut } from "./api.js";
import { HISTORY, drawRates, liveSocket } from "./chart.js";
import { ago, badge, bytes, clear, h, rate, table, when } from "./dom.js";
import { SwarmView } from "./swarm.js";

const main = document.getElementById("main");
let me = null; // GET /users/me/permissions
let stopView = () => {}; // what the current view must stop (timers, sockets) when another one opens
const clusterNames = new Map(); // scheduler cluster id -> name, for job results
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

function errorBox(error) {
  const text = error instanceof ApiError ? error.message : `unexpected error: ${error}`;
  return h("p", { class: "error", role: "alert" }, text);
}

/** Runs `work` for a button: disables it meanwhile, shows the error next to it. */
async function busy(button, out, work) {
  button.disabled = true;
  clear(out);
  try {
    await work();
  } catch (e) {
    out.append(errorBox(e));
  } finally {
    button.disabled = false;
  }
}

/** Calls `tick` now and every `seconds` until it returns true or the view changes; a failure is shown in
 * `out` (when given) and the next tick tries again. */
function every(seconds, tick, out) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    timer = null;
    let done = false;
    try {
      done = await tick();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return; // signed out: the sign-in form replaced the view
      if (out) clear(out).append(errorBox(e));
      else console.warn(e);
    }
    if (!done && !stopped) timer = setTimeout(run, seconds * 1000);
  };
  run();
  return () => {
    stopped = true;
    if (timer) clearTimeout(timer);
  };
}

// --- sign in and out -------------------------------------------------------------------------------------

function showSignIn(message) {
  me = null;
  stopView();
  stopView = () => {};
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  clear(document.getElementById("who"));
  const out = h("div", { id: "signin-out" });
  if (message) out.append(h("p", { class: "notice" }, message));
  const name = h("input", { id: "signin-name", name: "username", autocomplete: "username", required: true });
  const password = h("input", {
    id: "signin-password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
  });
  const submit = h("button", { id: "signin-submit", type: "submit" }, "Sign in");
  const form = h(
    "form",
    { id: "signin", class: "card narrow" },
    h("h1", {}, "Sign in to the dfz manager"),
    h("label", {}, "Name", name),
    h("label", {}, "Password", password),
    submit,
    out,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      await post("/sessions", { name: name.value, password: password.value });
      password.value = "";
      await start();
    });
  });
  clear(main).append(form);
  name.focus();
}

async function signOut() {
  try {
    await del("/sessions/current");
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 401) console.warn(e);
  }
  location.hash = "";
  showSignIn("Signed out.");
}

async function start() {
  try {
    me = await get("/users/me/permissions");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      showSignIn();
      return;
    }
    clear(main).append(errorBox(e));
    return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("nav-admin").hidden = !(may(me, "user", "read") || may(me, "daemon", "read") || may(me, "tenant", "write"));
  const who = clear(document.getElementById("who"));
  who.append(h("span", { id: "who-name" }, me.name), " ", h("span", { class: "muted" }, `(${me.role})`));
  if (may(me, "cluster", "read")) {
    all("/scheduler-clusters")
      .then((rows) => rows.forEach((c) => clusterNames.set(c.id, c.name)))
      .catch(() => {});
  }
  route();
}

whenSignedOut(() => showSignIn("Your session has ended: sign in again."));

// --- routing ---------------------------------------------------------------------------------------------

const VIEWS = {
  overview: overviewView,
  tasks: tasksView,
  jobs: jobsView,
  swarm: swarmView,
  admin: adminView,
  tokens: tokensView,
};

function route() {
  if (!me) return;
  stopView();
  stopView = () => {};
  const [name, arg] = location.hash.replace(/^#\/?/, "").split("/");
  const view = VIEWS[name] ? name : "overview";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("current", a.dataset.view === view);
  }
  clear(main);
  const stop = VIEWS[view](decodeURIComponent(arg || ""));
  if (typeof stop === "function") stopView = stop;
}

window.addEventListener("hashchange", route);
document.getElementById("sign-out").addEventListener("click", signOut);

// --- overview: clusters, schedulers, seed peers, hosts -----------------------------------------------------

function health(rows) {
  const active = rows.filter((r) => r.state === "active").length;
  return h("span", { class: active === rows.length && rows.length ? "ok" : active ? "warn" : "bad" }, `${active}/${rows.length} active`);
}

function instanceColumns(clusterKey, names) {
  return [
    ["", (r) => badge(r.state)],
    ["host", (r) => r.hostname],
    ["address", (r) => `${r.ip}:${r.port}`],
    ["cluster", (r) => names.get(r[clusterKey]) || r[clusterKey]],
    ["IDC / location", (r) => [r.idc, r.location].filter(Boolean).join(" · ")],
    ["last keepalive", (r) => ago(r.last_keepalive_at)],
  ];
}

/** The live part of the overview: every scheduler's totals and rates, and the most active tasks, pushed by the
 * manager's websocket (it covers every tenant: not for a user confined to one). */
function liveOverview(container) {
  const samples = [];
  let updates = 0;
  let closed = false;
  const status = h("p", { class: "muted", id: "live-status" }, "Connecting…");
  const chart = h("div", { id: "cluster-chart", class: "card chart" });
  const tasks = h("div", { id: "active-tasks" });
  const schedulers = h("div", { id: "live-schedulers" });
  container.append(
    h("h2", {}, "Throughput, every scheduler"),
    status,
    chart,
    h("h2", {}, "Most active tasks"),
    tasks,
    h("h2", {}, "Schedulers, live"),
    schedulers,
  );
  const show = (msg) => {
    if (msg.type === "error") {
      status.className = "error";
      status.textContent = `${msg.detail} (${msg.status})`;
      return;
    }
    if (msg.type !== "cluster") return;
    updates += 1;
    status.className = "muted";
    status.textContent = `Live · update ${updates} at ${new Date(msg.at).toLocaleTimeString()}`;
    status.dataset.updates = String(updates);
    samples.push({ peers: msg.rates.from_peers, origin: msg.rates.from_origin });
    if (samples.length > HISTORY) samples.shift();
    drawRates(chart, samples);
    clear(tasks).append(
      table(
        [
          ["", (t) => badge(t.state)],
          ["URL", (t) => h("span", { class: "url" }, t.url)],
          ["peers", (t) => `${t.peers} (${t.running + t.back_to_source} downloading, ${t.succeeded} done)`],
          ["size", (t) => bytes(t.content_length)],
          ["from peers / origin", (t) => `${bytes(t.bytes_from_peers)} / ${bytes(t.bytes_from_origin)}`],
          ["scheduler", (t) => t.scheduler],
          ["", (t) => h("a", { href: `#/swarm/${t.task_id}` }, "live swarm")],
        ],
        msg.tasks,
        { empty: "no task at any scheduler", id: "active-tasks-table" },
      ),
    );
    const r = (v) => (v === null || v === undefined ? "…" : rate(v));
    clear(schedulers).append(
      table(
        [
          ["", (x) => (x.ok ? badge("answering") : h("span", { class: "badge state-failed" }, "no answer"))],
          ["scheduler", (x) => `${x.hostname} (${x.endpoint})`],
          ["hosts", (x) => (x.ok ? `${x.hosts} (${x.seed_hosts} seed)` : h("span", { class: "error" }, x.error))],
          ["tasks", (x) => (x.ok ? x.tasks : "")],
          ["peers", (x) => (x.ok ? `${x.peers} (${x.downloading} downloading)` : "")],
          ["upload", (x) => (x.ok ? rate(x.upload_rate) : "")],
          ["from peers / origin", (x) => (x.ok ? `${r(x.rates.from_peers)} / ${r(x.rates.from_origin)}` : "")],
        ],
        msg.schedulers,
        { empty: "no active scheduler" },
      ),
    );
  };
  const socket = liveSocket({ type: "overview", interval: 1 }, show, (ev) => {
    if (closed) return;
    status.className = "error";
    status.textContent = `The live connection closed (${ev.code}). Open the overview again to reconnect.`;
  });
  return () => {
    closed = true;
    socket.close(1000, "view closed");
  };
}

function overviewView() {
  main.append(h("h1", {}, "Overview"));
  const body = h("div", { id: "overview" }, h("p", { class: "muted" }, "Loading…"));
  const live = h("div", { id: "overview-live" });
  main.append(body, live);
  if (!may(me, "cluster", "read")) {
    clear(body).append(h("p", { class: "notice" }, "Your role cannot read clusters (cluster:read)."));
    return undefined;
  }
  const stopLive = me.confined ? () => {} : liveOverview(live);
  const stopPolling = every(3, async () => {
    const [sclusters, spclusters, schedulers, seeds, hosts] = await Promise.all([
      all("/scheduler-clusters"),
      all("/seed-peer-clusters"),
      all("/schedulers"),
      all("/seed-peers"),
      all("/hosts"),
    ]);
    const sNames = new Map(sclusters.map((c) => [c.id, c.name]));
    const spNames = new Map(spclusters.map((c) => [c.id, c.name]));
    clear(body).append(
      h(
        "div",
        { class: "cards" },
        h("div", { class: "card stat" }, h("b", {}, "Schedulers"), health(schedulers)),
        h("div", { class: "card stat" }, h("b", {}, "Seed peers"), health(seeds)),
        h("div", { class: "card stat" }, h("b", {}, "Hosts"), health(hosts)),
      ),
      h("h2", {}, "Scheduler clusters"),
      table(
        [
          ["name", (c) => [c.name, c.is_default ? h("span", { class: "tag" }, "default") : ""]],
          ["schedulers", (c) => health(schedulers.filter((x) => x.scheduler_cluster_id === c.id))],
          ["seed-peer clusters", (c) => c.seed_peer_cluster_ids.map((id) => spNames.get(id) || id).join(", ")],
          ["hosts", (c) => health(hosts.filter((x) => x.scheduler_cluster_id === c.id))],
          ["scopes", (c) => JSON.stringify(c.scopes)],
        ],
        sclusters,
        { id: "scheduler-clusters" },
      ),
      h("h2", {}, "Schedulers"),
      table(instanceColumns("scheduler_cluster_id", sNames), schedulers, { id: "schedulers" }),
      h("h2", {}, "Seed peers"),
      table(instanceColumns("seed_peer_cluster_id", spNames), seeds, { id: "seed-peers" }),
      h("h2", {}, "Hosts"),
      table(
        [
          ["", (r) => badge(r.state)],
          ["host", (r) => r.hostname],
          ["address", (r) => `${r.ip}:${r.port}`],
          ["type", (r) => r.type],
          ["scheduler cluster", (r) => (r.scheduler_cluster_id ? sNames.get(r.scheduler_cluster_id) || r.scheduler_cluster_id : "")],
          ["tenant", (r) => r.tenant_id ?? ""],
          ["OS", (r) => [r.os, r.platform, r.arch].filter(Boolean).join(" ")],
          ["last keepalive", (r) => ago(r.last_keepalive_at)],
        ],
        hosts,
        { id: "hosts" },
      ),
      h("p", { class: "muted" }, `Updated ${new Date().toLocaleTimeString()}`),
    );
    return false;
  }, body);
  return () => {
    stopLive();
    stopPolling();
  };
}

// --- jobs: shared watching --------------------------------------------------------------------------------

/** Polls a job until it ends, calling `show(job)` each time; returns the stopper. */
function watchJob(id, show, out) {
  return every(
    0.5,
    async () => {
      const job = await get(`/jobs/${id}`);
      show(job);
      return TERMINAL.has(job.state);
    },
    out,
  );
}

function jobSummary(job) {
  return h(
    "dl",
    { class: "facts" },
    h("dt", {}, "job"),
    h("dd", {}, h("a", { href: `#/jobs/${job.id}` }, `#${job.id}`), ` ${job.type}`),
    h("dt", {}, "state"),
    h("dd", { id: "job-state", "data-state": job.state }, badge(job.state)),
    job.error ? [h("dt", {}, "error"), h("dd", { class: "error", id: "job-error" }, job.error)] : [],
    h("dt", {}, "created"),
    h("dd", {}, when(job.created_at)),
    job.finished_at ? [h("dt", {}, "finished"), h("dd", {}, when(job.finished_at))] : [],
  );
}

function progress(done, total) {
  const bar = h("span", { class: "bar" });
  const known = total > 0;
  bar.style.width = known ? `${Math.min(100, (100 * done) / total).toFixed(1)}%` : "0";
  return h("span", { class: "progress", title: known ? `${bytes(done)} of ${bytes(total)}` : bytes(done) }, bar);
}

function preheatTasks(job) {
  const tasks = (job.result && job.result.tasks) || [];
  return table(
    [
      ["", (t) => badge(t.state)],
      ["URL", (t) => h("span", { class: "url" }, t.url)],
      ["peer", (t) => `${t.peer.hostname} (${t.peer.kind})`],
      ["progress", (t) => [progress(t.bytes_done, t.content_length), " ", bytes(t.bytes_done)]],
      ["from origin / peers", (t) => `${bytes(t.bytes_from_origin)} / ${bytes(t.bytes_from_peers)}`],
      ["task", (t) => (t.task_id ? h("a", { href: `#/swarm/${t.task_id}` }, t.task_id.slice(0, 12)) : "")],
      ["error", (t) => (t.error ? h("span", { class: "error" }, t.error_kind ? `${t.error_kind}: ${t.error}` : t.error) : "")],
    ],
    tasks,
    { id: "job-tasks", empty: job.state === "pending" ? "waiting for the job runner…" : "no tasks (yet)" },
  );
}

function taskJobResult(job) {
  const r = job.result || {};
  const parts = [];
  for (const state of r.job_states || []) {
    for (const res of state.results || []) {
      const id = res.scheduler_cluster_id;
      const cluster = clusterNames.has(id) ? `cluster ${clusterNames.get(id)}` : `scheduler cluster ${id}`;
      if (res.peers) {
        parts.push(
          h("h3", {}, `${cluster}: ${res.peers.length} peer(s) hold it`),
          table(
            [
              ["", (p) => badge(p.state)],
              ["host", (p) => p.hostname],
              ["address", (p) => p.ip],
              ["type", (p) => p.host_type],
              ["pieces", (p) => [progress(p.finished_pieces, p.piece_count), ` ${p.finished_pieces}/${p.piece_count ?? "?"}`]],
              ["size", (p) => bytes(p.content_length)],
            ],
            res.peers,
            { empty: "no peer holds it", id: `cached-${res.scheduler_cluster_id}` },
          ),
        );
      } else {
        parts.push(
          h("h3", {}, `${cluster}: deleted on ${res.success_tasks.length}, failed on ${res.failure_tasks.length}`),
          table(
            [
              ["host", (t) => t.hostname],
              ["address", (t) => t.ip],
              ["result", (t) => (t.description ? h("span", { class: "error" }, t.description) : t.held ? "deleted" : "did not hold it")],
            ],
            [...res.failure_tasks, ...res.success_tasks],
            { empty: "no host held it", id: `deleted-${res.scheduler_cluster_id}` },
          ),
        );
      }
    }
  }
  const asked = r.schedulers || [];
  if (asked.length) {
    parts.push(
      h("h3", {}, "Schedulers asked"),
      table(
        [
          ["", (a) => badge(a.state)],
          ["scheduler", (a) => `${a.hostname} (${a.ip})`],
          ["answer", (a) => a.error || `${a.records} record(s)${a.truncated ? ", truncated" : ""}`],
        ],
        asked,
      ),
    );
  }
  return parts;
}

function imageFacts(job) {
  const image = job.result && job.result.image;
  if (!image) return "";
  return h(
    "dl",
    { class: "facts", id: "job-image" },
    Object.entries(image).map(([key, value]) => [
      h("dt", {}, key),
      h("dd", { class: "url" }, Array.isArray(value) ? value.join("\n") : typeof value === "object" ? JSON.stringify(value) : String(value)),
    ]),
  );
}

function jobDetail(job) {
  return h(
    "div",
    { id: "job-detail" },
    jobSummary(job),
    job.type === "preheat" ? [imageFacts(job), h("h3", {}, "Tasks"), preheatTasks(job)] : taskJobResult(job),
  );
}

// --- tasks: find, where cached, delete ------------------------------------------------------------------------

function tasksView() {
  main.append(h("h1", {}, "Tasks"));
  const url = h("input", { id: "task-url", type: "url", placeholder: "https://origin/path/file", size: 60 });
  const tag = h("input", { id: "task-tag", placeholder: "tag (optional)" });
  const application = h("input", { id: "task-application", placeholder: "application (optional)" });
  const taskId = h("input", { id: "task-id", placeholder: "or a task id: 64 hex digits", size: 66, pattern: "[0-9a-f]{64}" });
  const out = h("div", { id: "task-out" });
  const findButton = h("button", { type: "submit", id: "task-find" }, "Find task id");
  const cachedButton = h("button", { type: "button", id: "task-cached" }, "Where is it cached?");
  const deleteButton = h("button", { type: "button", id: "task-delete", class: "danger" }, "Delete from every cache…");
  const swarmButton = h("button", { type: "button", id: "task-swarm" }, "Live swarm");
  let stopWatch = () => {};

  // A task id found from a URL belongs to that URL: editing the URL (or its tag or application) forgets it.
  for (const input of [url, tag, application]) input.addEventListener("input", () => (taskId.value = ""));

  async function resolve() {
    const id = taskId.value.trim();
    if (id) {
      if (!/^[0-9a-f]{64}$/.test(id)) throw new ApiError(422, "a task id is 64 lowercase hex digits");
      return id;
    }
    if (!url.value.trim()) throw new ApiError(422, "give a URL or a task id");
    const params = new URLSearchParams({ url: url.value.trim() });
    if (tag.value) params.set("tag", tag.value);
    if (application.value) params.set("application", application.value);
    const got = await get(`/task-id?${params}`);
    taskId.value = got.task_id;
    return got.task_id;
  }

  async function runJob(type, id) {
    stopWatch();
    const job = await post("/jobs", { type, args: { task_id: id }, bio: `console: ${type}` });
    const shown = h("div", {});
    out.append(shown);
    stopWatch = watchJob(job.id, (fresh) => clear(shown).append(jobDetail(fresh)), shown);
  }

  const form = h(
    "form",
    { class: "card", id: "task-form" },
    h("div", { class: "row" }, h("label", {}, "URL", url), h("label", {}, "Tag", tag), h("label", {}, "Application", application)),
    h("div", { class: "row" }, h("label", {}, "Task id", taskId)),
    h("div", { class: "row" }, findButton, cachedButton, deleteButton, swarmButton),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(findButton, out, async () => {
      const id = await resolve();
      out.append(h("p", {}, "Task id ", h("code", { id: "task-id-found" }, id)));
    });
  });
  cachedButton.addEventListener("click", () => busy(cachedButton, out, async () => runJob("get_task", await resolve())));
  deleteButton.addEventListener("click", () =>
    busy(deleteButton, out, async () => {
      const id = await resolve();
      if (!window.confirm(`Delete task ${id} from every peer's cache and from the schedulers?`)) return;
      await runJob("delete_task", id);
    }),
  );
  swarmButton.addEventListener("click", () =>
    busy(swarmButton, out, async () => {
      location.hash = `#/swarm/${await resolve()}`;
    }),
  );
  if (!may(me, "job", "write")) {
    for (const b of [cachedButton, deleteButton]) b.hidden = true;
    out.append(h("p", { class: "notice" }, "Looking up and deleting tasks runs jobs: your role cannot (job:write)."));
  }
  main.append(form, out);
  return () => stopWatch();
}

// --- preheat and jobs ---------------------------------------------------------------------------------------

function preheatForm(onCreated) {
  const kind = h("select", { id: "preheat-type" }, h("option", { value: "file" }, "file"), h("option", { value: "image" }, "image"));
  const urls = h("textarea", { id: "preheat-urls", rows: 3, cols: 70, placeholder: "one URL a line (an image: its manifest URL)" });
  const scope = h(
    "select",
    { id: "preheat-scope" },
    ["single_seed_peer", "all_seed_peers", "all_peers"].map((v) => h("option", { value: v }, v)),
  );
  const clusters = h("select", { id: "preheat-clusters", multiple: true, size: 3 });
  const platform = h("input", { id: "preheat-platform", placeholder: "linux/amd64" });
  const username = h("input", { id: "preheat-username", autocomplete: "off" });
  const password = h("input", { id: "preheat-password", type: "password", autocomplete: "new-password" });
  const timeout = h("input", { id: "preheat-timeout", type: "number", min: 1, max: 86400, placeholder: "seconds (default 1 h)" });
  const submit = h("button", { type: "submit", id: "preheat-submit" }, "Preheat");
  const out = h("div", { id: "preheat-out" });
  const imageOnly = h("div", { class: "row", hidden: true }, h("label", {}, "Platform", platform), h("label", {}, "Registry user", username), h("label", {}, "Password", password));
  kind.addEventListener("change", () => {
    imageOnly.hidden = kind.value !== "image";
  });
  all("/scheduler-clusters")
    .then((rows) => clusters.append(...rows.map((c) => h("option", { value: c.id }, c.name))))
    .catch(() => {});
  const form = h(
    "form",
    { class: "card", id: "preheat-form" },
    h("h2", {}, "Preheat"),
    h("div", { class: "row" }, h("label", {}, "Type", kind), h("label", {}, "Scope", scope), h("label", {}, "Clusters (none: all)", clusters), h("label", {}, "Timeout", timeout)),
    h("label", {}, "URLs", urls),
    imageOnly,
    submit,
    out,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      const list = urls.value.split("\n").map((u) => u.trim()).filter(Boolean);
      if (!list.length) throw new ApiError(422, "give at least one URL");
      const args = { type: kind.value, scope: scope.value };
      if (list.length === 1) args.url = list[0];
      else args.urls = list;
      if (kind.value === "image") {
        if (platform.value) args.platform = platform.value;
        if (username.value) args.username = username.value;
        if (password.value) args.password = password.value;
      }
      if (timeout.value) args.timeout = Math.round(Number(timeout.value)) * 1e9;
      const ids = [...clusters.selectedOptions].map((o) => Number(o.value));
      const job = await post("/jobs", { type: "preheat", args, scheduler_cluster_ids: ids, bio: "console: preheat" });
      password.value = "";
      onCreated(job);
    });
  });
  return form;
}

function jobsView(arg) {
  if (arg) return jobView(Number(arg));
  main.append(h("h1", {}, "Preheat & jobs"));
  if (may(me, "job", "write")) {
    main.append(preheatForm((job) => (location.hash = `#/jobs/${job.id}`)));
  }
  const list = h("div", { id: "jobs" });
  main.append(h("h2", {}, "Recent jobs"), list);
  return every(2, async () => {
    const jobs = await newest("/jobs", 25);
    clear(list).append(
      table(
        [
          ["", (j) => badge(j.state)],
          ["job", (j) => h("a", { href: `#/jobs/${j.id}` }, `#${j.id}`)],
          ["type", (j) => j.type],
          ["what", (j) => h("span", { class: "url" }, j.args.url || (j.args.urls || []).join(" ") || j.args.task_id || "")],
          ["created", (j) => ago(j.created_at)],
          ["error", (j) => (j.error ? h("span", { class: "error" }, j.error.slice(0, 200)) : "")],
        ],
        jobs,
        { empty: "no jobs yet" },
      ),
    );
    return false;
  }, list);
}

function jobView(id) {
  main.append(h("h1", {}, `Job #${id}`));
  const out = h("div", { id: "job-out" });
  const cancel = h("button", { type: "button", id: "job-cancel", class: "danger", hidden: true }, "Cancel job");
  const msg = h("div", {});
  cancel.addEventListener("click", () =>
    busy(cancel, msg, async () => {
      if (window.confirm(`Cancel job #${id}?`)) await post(`/jobs/${id}/cancel`);
    }),
  );
  main.append(out, cancel, msg);
  return watchJob(
    id,
    (job) => {
      cancel.hidden = TERMINAL.has(job.state) || !may(me, "job", "write");
      clear(out).append(jobDetail(job));
    },
    out,
  );
}

// --- live swarm ---------------------------------------------------------------------------------------------

function swarmView(taskId) {
  const view = new SwarmView(main, taskId);
  return () => view.close();
}

// --- admin: users, roles, tenants, tokens -------------------------------------------------------------------

function section(title, id, load) {
  const body = h("div", { id }, h("p", { class: "muted" }, "Loading…"));
  const refresh = () =>
    load(body).catch((e) => {
      clear(body).append(errorBox(e));
    });
  refresh();
  return [h("h2", {}, title), body, refresh];
}

function adminView() {
  main.append(h("h1", {}, "Administration"));
  const tenants = new Map();
  const roles = new Map();
  const reload = [];
  const add = (title, id, load) => {
    const [heading, body, refresh] = section(title, id, load);
    main.append(heading, body);
    reload.push(refresh);
  };
  const lookups = Promise.all([
    may(me, "tenant", "read") ? all("/tenants").then((rows) => rows.forEach((t) => tenants.set(t.id, t.name))) : null,
    may(me, "user", "read") ? all("/roles").then((rows) => rows.forEach((r) => roles.set(r.id, r))) : null,
  ]);
  const tenantName = (id) => (id === null || id === undefined ? "" : tenants.get(id) || `#${id}`);
  const refreshAll = () => reload.forEach((r) => r());

  if (may(me, "user", "read")) {
    add("Users", "admin-users", async (body) => {
      await lookups;
      if (may(me, "tenant", "read")) for (const t of await all("/tenants")) tenants.set(t.id, t.name);
      for (const r of await all("/roles")) roles.set(r.id, r);
      const rows = await all("/users");
      const parts = [
        table(
          [
            ["", (u) => badge(u.state)],
            ["name", (u) => u.name],
            ["email", (u) => u.email || ""],
            ["role", (u) => (roles.get(u.role_id) || {}).name || u.role_id],
            ["tenant", (u) => tenantName(u.tenant_id)],
            ["last sign-in", (u) => ago(u.last_sign_in_at)],
            ["", (u) => (may(me, "user", "write") && u.id !== me.user_id ? userStateButton(u, refreshAll) : "")],
          ],
          rows,
          { id: "users-table" },
        ),
      ];
      if (may(me, "user", "write")) parts.push(userForm(roles, tenants, refreshAll));
      clear(body).append(...parts);
    });
    add("Roles", "admin-roles", async (body) => {
      await lookups;
      for (const r of await all("/roles")) roles.set(r.id, r);
      clear(body).append(
        table(
          [
            ["name", (r) => [r.name, r.builtin ? h("span", { class: "tag" }, "built in") : ""]],
            ["permissions", (r) => r.permissions.join(", ")],
            ["about", (r) => r.bio],
          ],
          [...roles.values()],
          { id: "roles-table" },
        ),
        may(me, "user", "write") && !me.confined ? roleForm(refreshAll) : "",
      );
    });
  }
  if (may(me, "tenant", "read")) {
    add("Tenants", "admin-tenants", async (body) => {
      const rows = await all("/tenants");
      for (const t of rows) tenants.set(t.id, t.name);
      const columns = [["", (t) => badge(t.state)], ["id", (t) => t.id], ["name", (t) => t.name], ["about", (t) => t.bio]];
      const parts = [table(columns, rows, { id: "tenants-table" })];
      if (may(me, "tenant", "write")) parts.push(tenantForm(refreshAll));
      clear(body).append(...parts);
    });
  }
  if (may(me, "user", "read")) {
    add("Personal access tokens (all users)", "admin-tokens", async (body) => {
      const [rows, users] = await Promise.all([all("/personal-access-tokens"), all("/users")]);
      const names = new Map(users.map((u) => [u.id, u.name]));
      clear(body).append(tokenTable(rows, names, refreshAll));
    });
  }
  if (may(me, "daemon", "read")) {
    add("Daemon tokens", "admin-daemon-tokens", async (body) => {
      await lookups;
      const rows = await all("/daemon-tokens");
      const parts = [
        table(
          [
            ["", (t) => badge(t.state)],
            ["name", (t) => t.name],
            ["prefix", (t) => h("code", {}, `${t.prefix}…`)],
            ["tenant", (t) => tenantName(t.tenant_id)],
            ["expires", (t) => when(t.expires_at)],
            ["last used", (t) => ago(t.last_used_at)],
            ["", (t) => (t.state === "active" && may(me, "daemon", "write") ? revokeButton(`/daemon-tokens/${t.id}`, t.name, refreshAll) : "")],
          ],
          rows,
        ),
      ];
      if (may(me, "daemon", "write")) parts.push(daemonTokenForm(tenants, refreshAll));
      clear(body).append(...parts);
    });
  }
  if (!reload.length) main.append(h("p", { class: "notice" }, "Your role administers nothing here."));
}

function revokeButton(path, name, done) {
  const button = h("button", { type: "button", class: "danger small" }, "Revoke");
  const out = h("span", {});
  button.addEventListener("click", () =>
    busy(button, out, async () => {
      if (!window.confirm(`Revoke ${name}? Whatever uses it stops working.`)) return;
      await del(path);
      done();
    }),
  );
  return [button, out];
}

function tokenTable(rows, names, done) {
  return table(
    [
      ["", (t) => badge(t.state)],
      ["name", (t) => t.name],
      ["user", (t) => (names ? names.get(t.user_id) || t.user_id : "")],
      ["prefix", (t) => h("code", {}, `${t.prefix}…`)],
      ["scopes", (t) => t.scopes.join(", ")],
      ["expires", (t) => when(t.expires_at)],
      ["last used", (t) => ago(t.last_used_at)],
      ["", (t) => (t.state === "active" ? revokeButton(`/personal-access-tokens/${t.id}`, t.name, done) : "")],
    ],
    rows,
    { id: "token-table" },
  );
}

function shownOnce(secret, what) {
  return h(
    "div",
    { class: "card secret", id: "secret-shown" },
    h("p", {}, `The new ${what}, shown this once: copy it now.`),
    h("code", { id: "secret-value" }, secret),
  );
}

function userStateButton(user, done) {
  const enabled = user.state === "enabled";
  const button = h("button", { type: "button", class: ["small", enabled ? "danger" : ""] }, enabled ? "Disable" : "Enable");
  const out = h("span", {});
  button.addEventListener("click", () =>
    busy(button, out, async () => {
      if (enabled && !window.confirm(`Disable ${user.name}? Their sessions and tokens stop working.`)) return;
      await patch(`/users/${user.id}`, { state: enabled ? "disabled" : "enabled" });
      done();
    }),
  );
  return [button, out];
}

/** Checkboxes of every permission group (read, or read and write); `chosen()` gives the permission words. */
function permissionPicker() {
  const rows = Object.entries(me.groups).map(([group, about]) => {
    const read = h("input", { type: "checkbox", value: `${group}:read`, "data-group": group });
    const write = h("input", { type: "checkbox", value: group, "data-group": group });
    return [h("tr", {}, h("td", {}, group), h("td", {}, read), h("td", {}, write), h("td", { class: "muted" }, about)), read, write];
  });
  const element = h(
    "table",
    { class: "scopes" },
    h("thead", {}, h("tr", {}, h("th", {}, "permission"), h("th", {}, "read"), h("th", {}, "read and write"), h("th", {}, ""))),
    h("tbody", {}, rows.map(([row]) => row)),
  );
  const chosen = () => {
    const words = [];
    for (const [, read, write] of rows) {
      if (write.checked) words.push(write.value);
      else if (read.checked) words.push(read.value);
    }
    return words;
  };
  return { element, chosen };
}

function roleForm(done) {
  const name = h("input", { required: true, autocomplete: "off", id: "role-name" });
  const bio = h("input", {});
  const picker = permissionPicker();
  const submit = h("button", { type: "submit", id: "role-submit" }, "Create role");
  const out = h("div", {});
  const form = h("form", { class: "card", id: "role-form" }, h("h3", {}, "New role"), h("div", { class: "row" }, h("label", {}, "Name", name), h("label", {}, "About", bio)), picker.element, submit, out);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      const permissions = picker.chosen();
      if (!permissions.length) throw new ApiError(422, "choose at least one permission");
      await post("/roles", { name: name.value, bio: bio.value, permissions });
      done();
    });
  });
  return form;
}

function userForm(roles, tenants, done) {
  const name = h("input", { id: "user-name", required: true, autocomplete: "off" });
  const password = h("input", { id: "user-password", type: "password", required: true, autocomplete: "new-password", minlength: 8 });
  const role = h("select", { id: "user-role" }, [...roles.values()].map((r) => h("option", { value: r.id }, r.name)));
  const tenant = h("select", { id: "user-tenant" }, h("option", { value: "" }, "(none)"), [...tenants].map(([id, n]) => h("option", { value: id }, n)));
  const submit = h("button", { type: "submit", id: "user-submit" }, "Create user");
  const out = h("div", {});
  const form = h("form", { class: "card", id: "user-form" }, h("h3", {}, "New user"), h("div", { class: "row" }, h("label", {}, "Name", name), h("label", {}, "Password", password), h("label", {}, "Role", role), h("label", {}, "Tenant", tenant)), submit, out);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      const body = { name: name.value, password: password.value, role_id: Number(role.value) };
      if (tenant.value) body.tenant_id = Number(tenant.value);
      await post("/users", body);
      done();
    });
  });
  return form;
}

function tenantForm(done) {
  const name = h("input", { id: "tenant-name", required: true, autocomplete: "off" });
  const bio = h("input", {});
  const submit = h("button", { type: "submit", id: "tenant-submit" }, "Create tenant");
  const out = h("div", {});
  const form = h("form", { class: "card", id: "tenant-form" }, h("h3", {}, "New tenant"), h("div", { class: "row" }, h("label", {}, "Name", name), h("label", {}, "About", bio)), submit, out);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      await post("/tenants", { name: name.value, bio: bio.value });
      done();
    });
  });
  return form;
}

function daemonTokenForm(tenants, done) {
  const name = h("input", { required: true, autocomplete: "off" });
  const tenant = h("select", {}, me.confined ? h("option", { value: "" }, "(my tenant)") : [...tenants].map(([id, n]) => h("option", { value: id }, n)));
  const submit = h("button", { type: "submit" }, "Create daemon token");
  const out = h("div", {});
  const form = h("form", { class: "card" }, h("h3", {}, "New daemon token"), h("div", { class: "row" }, h("label", {}, "Name", name), h("label", {}, "Tenant", tenant)), submit, out);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      const body = { name: name.value };
      if (tenant.value) body.tenant_id = Number(tenant.value);
      const made = await post("/daemon-tokens", body);
      done();
      out.append(shownOnce(made.token, "daemon token (dfz daemon --tenant-token)"));
    });
  });
  return form;
}

// --- my tokens ------------------------------------------------------------------------------------------------

function tokensView() {
  main.append(h("h1", {}, "My personal access tokens"));
  const list = h("div", { id: "my-tokens" });
  const load = () =>
    all(`/personal-access-tokens?user_id=${me.user_id}`)
      .then((rows) => clear(list).append(tokenTable(rows, null, load)))
      .catch((e) => clear(list).append(errorBox(e)));
  const name = h("input", { id: "token-name", required: true, autocomplete: "off" });
  const days = h("input", { id: "token-days", type: "number", min: 1, max: 366, value: 30 });
  const picker = permissionPicker();
  const submit = h("button", { type: "submit", id: "token-submit" }, "Create token");
  const out = h("div", {});
  const form = h(
    "form",
    { class: "card", id: "token-form" },
    h("h2", {}, "New token"),
    h("div", { class: "row" }, h("label", {}, "Name", name), h("label", {}, "Days valid", days)),
    picker.element,
    submit,
    out,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, out, async () => {
      const chosen = picker.chosen();
      if (!chosen.length) throw new ApiError(422, "choose at least one scope");
      const expires = new Date(Date.now() + Number(days.value || 30) * 86400e3).toISOString();
      const made = await post("/personal-access-tokens", { name: name.value, scopes: chosen, expires_at: expires });
      load();
      out.append(shownOnce(made.token, "token (Authorization: Bearer …)"));
    });
  });
  main.append(list, form);
  load();
}

start();

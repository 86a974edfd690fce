"""The manager's job runner: preheat jobs run inside ``dfz mgr``, asynchronously, in trio tasks.

Theory of operation:

* **Jobs are rows.** The REST API (``/api/v1/jobs``) and the open API (``/oapi/v1/jobs``) only insert a
  ``pending`` row. The runner looks for pending rows every ``poll`` seconds, claims one (``pending`` →
  ``running``, a conditional update, so two runners never both take it) and runs it in a task of its own,
  at most ``max_jobs`` at once. At start it first takes the rows left ``running`` by a manager that
  stopped or died: **a job resumes after a restart**, its finished tasks kept, the others sent again
  (a seed peer still downloading one joins its own download: the task id is the same).
* **A preheat is planned, then run.** Planning makes the job's URLs (a file: ``url``/``urls``; an image:
  the layer blobs of its manifest for the platform, ``oci.py``), the scheduler clusters (the job's, or all)
  and, per cluster, the peers by ``scope``: ``single_seed_peer`` one seed peer (chosen by the URL's hash,
  so a URL keeps going to the same one), ``all_seed_peers`` every seed peer, ``all_peers`` every seed peer
  and every daemon session of the cluster, each narrowed by ``ips``, ``count`` or ``percentage``. The
  seed peers of a cluster are the active seed peers of the seed-peer clusters linked to it that hold a
  fabric session with this manager; the runner waits up to ``seed_wait`` for one to appear (after a
  restart they register again). A task is one URL on one peer.
* **A task is a push and reports.** The runner pushes ``mgr.preheat`` to the peer's session; the peer
  downloads into its cache through its schedulers (``Daemon.download``) and answers with
  ``mgr.task_report`` requests. A peer whose session ends is waited for (``seed_wait``) and sent the push
  again on its new session; the job's ``timeout`` (default ``default_timeout``) fails what is left.
* **Rate limit.** At most ``cluster_concurrency`` tasks run at once per scheduler cluster, across jobs.
* **The result** (JSON, saved at most every ``save_interval`` while it changes) has Dragonfly's shape,
  ``{"state", "job_states": [{"task_name", "state", "error", "results": [{"scheduler_cluster_id",
  "success_tasks", "failure_tasks"}]}]}``, plus dfz's own ``tasks`` (every task's state, bytes and error)
  and, for an image, ``image`` (its manifest digest and blob URLs). The job ends ``succeeded`` when every
  task did, ``failed`` otherwise, with ``error`` saying the first reasons.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import trio
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from ..log import event, get_logger
from .db import Database
from .messages import MgrPreheat, MgrTaskReport
from .models import Job, JobSchedulerCluster, SchedulerCluster, SeedPeer, SeedPeerClusterLink, utcnow
from .oci import DEFAULT_PLATFORM, ImageError, resolve_image
from .schemas import PreheatArgs

log = get_logger("mgr.jobs")

JOB_TYPES = ("preheat",)
"""The job types this runner runs (others stay pending for a runner that knows them)."""


@dataclass(frozen=True)
class JobSettings:
    poll: float = 0.5
    """Seconds between two looks for pending jobs."""
    max_jobs: int = 8
    """Jobs run at once."""
    cluster_concurrency: int = 4
    """Preheat tasks (one URL on one peer) running at once per scheduler cluster, across jobs."""
    seed_wait: float = 10.0
    """Seconds to wait for a cluster's seed peers (or a task's peer) to hold a session with this manager."""
    default_timeout: float = 3600.0
    """Seconds a job may run when its arguments give no ``timeout``."""
    save_interval: float = 0.5
    """Least seconds between two writes of a running job's result."""


@dataclass(frozen=True)
class Peer:
    """Where a task goes: a seed peer (by instance id) or a daemon session (by host id)."""

    key: str
    """``seed_peer:ID`` or ``host:HOST_ID``: the same peer across sessions and restarts."""
    hostname: str
    ip: str
    kind: str


@dataclass
class Task:
    index: int
    url: str
    cluster_id: int
    peer: Peer
    state: str = "pending"
    """``pending``, ``running``, ``succeeded`` or ``failed``."""
    task_id: str = ""
    content_length: int = -1
    bytes_done: int = 0
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    error: str = ""
    error_kind: str = ""
    done: trio.Event = field(default_factory=trio.Event)
    rid: bytes | None = None
    """The session it was pushed to."""

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "url": self.url,
            "scheduler_cluster_id": self.cluster_id,
            "peer": {"key": self.peer.key, "hostname": self.peer.hostname, "ip": self.peer.ip, "kind": self.peer.kind},
            "state": self.state,
            "task_id": self.task_id,
            "content_length": self.content_length,
            "bytes_done": self.bytes_done,
            "bytes_from_origin": self.bytes_from_origin,
            "bytes_from_peers": self.bytes_from_peers,
            "error": self.error,
            "error_kind": self.error_kind,
        }


class JobFailed(Exception):
    """The job cannot run at all (bad image, no cluster): the message is its error."""


@dataclass
class _Running:
    job_id: int
    tasks: dict[int, Task] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    extra: dict[str, Any] = field(default_factory=dict)


class JobRunner:
    """See the module's docstring. ``fabric`` is the manager's :class:`~dfz.mgr.fabric.ManagerFabric`;
    ``await nursery.start(runner.run)``; cancel to stop (running jobs stay ``running`` and resume)."""

    def __init__(self, db: Database, fabric: Any, settings: JobSettings | None = None) -> None:
        self.db = db
        self.fabric = fabric
        self.settings = settings or JobSettings()
        self._jobs = trio.CapacityLimiter(self.settings.max_jobs)
        self._clusters: dict[int, trio.CapacityLimiter] = {}
        self._running: dict[int, _Running] = {}
        fabric.on_task_report = self.on_report

    # --- the loop -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[JobRunner] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            resumed = await trio.to_thread.run_sync(self._running_ids)
            for job_id in resumed:
                event(log, logging.INFO, "mgr_job_resumed", job=job_id)
                nursery.start_soon(self._run_job, job_id)
            task_status.started(self)
            while True:
                try:
                    waiting = await trio.to_thread.run_sync(self._pending, self.settings.max_jobs - len(self._running))
                    ready = [job_id for job_id, age, seeds in waiting if age >= self.settings.seed_wait or self._reachable(seeds)]
                    claimed = await trio.to_thread.run_sync(self._claim, ready)
                except SQLAlchemyError as e:
                    event(log, logging.ERROR, "mgr_store_failed", error=repr(e)[:500])
                    claimed = []
                for job_id in claimed:
                    nursery.start_soon(self._run_job, job_id)
                await trio.sleep(self.settings.poll)

    def _running_ids(self) -> list[int]:
        with self.db.reading() as session:
            rows = session.exec(select(Job.id).where(Job.state == "running", col(Job.type).in_(JOB_TYPES)).order_by(col(Job.id)))
            return [i for i in rows if i is not None]

    def _reachable(self, seeds: list[str]) -> bool:
        return any(self.fabric.session_of(key) is not None for key in seeds)

    def _pending(self, room: int) -> list[tuple[int, float, list[str]]]:
        """Up to ``room`` pending jobs: id, age in seconds, and the seed peers of their clusters. A job stays
        pending until one of them is connected (or ``seed_wait`` passed: then it runs, and says what is missing)."""
        if room <= 0:
            return []
        out: list[tuple[int, float, list[str]]] = []
        with self.db.reading() as session:
            jobs = session.exec(
                select(Job).where(Job.state == "pending", col(Job.type).in_(JOB_TYPES)).order_by(col(Job.id)).limit(room)
            )
            rows = [(j.id, j.created_at) for j in jobs if j.id is not None]
        now = utcnow()
        for job_id, created in rows:
            try:
                _, wanted, clusters = self._load(job_id)
            except JobFailed:
                continue  # deleted meanwhile
            seeds = [p.key for cid, _ in clusters if not wanted or cid in wanted for p in self._seed_peers(cid)]
            out.append((job_id, (now - created).total_seconds(), seeds))
        return out

    def _claim(self, ids: list[int]) -> list[int]:
        claimed: list[int] = []
        for job_id in ids:
            with self.db.writing() as session:
                now = utcnow()
                done = session.execute(
                    sa.update(Job)
                    .where(col(Job.id) == job_id, col(Job.state) == "pending")
                    .values(state="running", started_at=now, updated_at=now)
                )
                if done.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(job_id)
        return claimed

    # --- one job ------------------------------------------------------------------------------------------

    async def _run_job(self, job_id: int) -> None:
        running = self._running[job_id] = _Running(job_id)
        try:
            async with self._jobs:
                await self._preheat(running)
        except JobFailed as e:
            await self._finish(running, "failed", str(e))
        except SQLAlchemyError as e:
            event(log, logging.ERROR, "mgr_store_failed", job=job_id, error=repr(e)[:500])
        finally:
            del self._running[job_id]

    def _load(self, job_id: int) -> tuple[Job, list[int], list[tuple[int, str]]]:
        with self.db.reading() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobFailed(f"job {job_id} is gone")
            link = JobSchedulerCluster
            wanted = list(session.exec(select(link.scheduler_cluster_id).where(link.job_id == job_id)))
            rows = session.exec(select(SchedulerCluster).order_by(col(SchedulerCluster.id)))
            clusters = [(c.id, c.name) for c in rows if c.id is not None]
            session.expunge(job)
            return job, wanted, clusters

    async def _preheat(self, running: _Running) -> None:
        job, wanted, clusters = await trio.to_thread.run_sync(self._load, running.job_id)
        try:
            args = PreheatArgs.model_validate(job.args)
        except ValueError as e:
            raise JobFailed(f"the job's arguments are not a preheat's: {e}") from None
        started = job.started_at or utcnow()
        timeout = float(args.timeout) if args.timeout else self.settings.default_timeout
        deadline = trio.current_time() + max(0.0, timeout - (utcnow() - started).total_seconds())
        cluster_ids = [cid for cid, _ in clusters if not wanted or cid in wanted]
        if not cluster_ids:
            raise JobFailed("no scheduler cluster to preheat in" + (f" (asked: {wanted})" if wanted else ""))
        event(log, logging.INFO, "mgr_job_started", job=job.id, kind=args.type, clusters=",".join(map(str, cluster_ids)))

        headers = dict(args.headers)
        if args.type == "image":
            assert args.url is not None
            try:
                with trio.fail_after(max(1.0, min(60.0, deadline - trio.current_time()))):
                    image = await resolve_image(
                        str(args.url), headers=headers, username=args.username, password=args.password, platform=args.platform
                    )
            except ImageError as e:
                raise JobFailed(f"cannot resolve the image: {e}") from None
            except trio.TooSlowError:
                raise JobFailed("cannot resolve the image: the registry did not answer in time") from None
            urls, headers = image.blobs, image.headers
            platform = args.platform or DEFAULT_PLATFORM
            running.extra["image"] = {"manifest_digest": image.manifest_digest, "platform": platform, "blobs": urls}
        else:
            urls = [str(args.url)] if args.url is not None else [str(u) for u in args.urls]

        previous = {(t["url"], t["peer"]["key"]): t for t in job.result.get("tasks", []) if isinstance(t, dict) and "peer" in t}
        plan: list[Task] = []
        seen: set[tuple[str, str]] = set()
        for cid in cluster_ids:
            peers = await self._peers_of(cid, args, min(deadline, trio.current_time() + self.settings.seed_wait))
            if not peers:
                for url in urls:
                    why = f"no seed peer of scheduler cluster {cid} is connected to the manager"
                    plan.append(Task(len(plan), url, cid, Peer("", "", "", ""), "failed", error=why, error_kind="no_seed_peer"))
                continue
            for url in urls:
                chosen = [_by_hash(peers, url)] if args.scope == "single_seed_peer" else peers
                for peer in chosen:
                    if (url, peer.key) in seen:
                        continue
                    seen.add((url, peer.key))
                    task = Task(len(plan), url, cid, peer)
                    old = previous.get((url, peer.key))
                    if old is not None and old.get("state") == "succeeded":
                        task.state, task.task_id = "succeeded", str(old.get("task_id", ""))
                        task.content_length = int(old.get("content_length", -1))
                        task.bytes_done = int(old.get("bytes_done", 0))
                    plan.append(task)
        running.tasks = {t.index: t for t in plan}
        await self._save(running)

        async with trio.open_nursery() as nursery:
            for task in plan:
                if task.state not in {"succeeded", "failed"}:
                    nursery.start_soon(self._run_task, running, task, args, headers, deadline)
            nursery.start_soon(self._saver, running)
            await self._all_done(running)
            nursery.cancel_scope.cancel()
        failed = [t for t in plan if t.state != "succeeded"]
        if failed:
            reasons = sorted({f"{t.error}" for t in failed if t.error})
            await self._finish(running, "failed", f"{len(failed)} of {len(plan)} tasks failed: " + "; ".join(reasons)[:900])
        else:
            await self._finish(running, "succeeded", "")

    async def _all_done(self, running: _Running) -> None:
        for task in list(running.tasks.values()):
            if task.state not in ("succeeded", "failed"):
                await task.done.wait()

    async def _peers_of(self, cluster_id: int, args: PreheatArgs, until: float) -> list[Peer]:
        """The peers of ``cluster_id`` the job goes to (by scope), waiting until ``until`` for a seed peer."""
        while True:
            seeds = await trio.to_thread.run_sync(self._seed_peers, cluster_id)
            reachable = [p for p in seeds if self.fabric.session_of(p.key) is not None]
            if reachable or trio.current_time() >= until:
                break
            await trio.sleep(0.2)
        peers = sorted(reachable, key=lambda p: p.key)
        if args.scope == "all_peers":
            daemons = self.fabric.daemons_of(cluster_id)
            peers += [Peer(f"host:{host_id}", hostname, ip, "daemon") for host_id, hostname, ip in daemons]
        if args.scope != "single_seed_peer":
            if args.ips:
                peers = [p for p in peers if p.ip in set(args.ips)]
            elif args.count:
                peers = peers[: args.count]
            elif args.percentage:
                peers = peers[: max(1, math.ceil(len(peers) * args.percentage / 100))]
        return peers

    def _seed_peers(self, cluster_id: int) -> list[Peer]:
        with self.db.reading() as session:
            link = SeedPeerClusterLink
            served = select(link.seed_peer_cluster_id).where(link.scheduler_cluster_id == cluster_id)
            active = select(SeedPeer).where(SeedPeer.state == "active", col(SeedPeer.seed_peer_cluster_id).in_(served))
            rows = session.exec(active)
            return [Peer(f"seed_peer:{r.id}", r.hostname, r.ip, "seed_peer") for r in rows]

    async def _run_task(self, running: _Running, task: Task, args: PreheatArgs, headers: dict[str, str], deadline: float) -> None:
        limiter = self._clusters.setdefault(task.cluster_id, trio.CapacityLimiter(self.settings.cluster_concurrency))
        with trio.move_on_at(deadline) as timed:
            async with limiter:
                await self._drive(running, task, args, headers, deadline)
        if timed.cancelled_caught and task.state not in ("succeeded", "failed"):
            self._end(running, task, "failed", "the job's timeout passed before the task finished", "timeout")

    async def _drive(self, running: _Running, task: Task, args: PreheatArgs, headers: dict[str, str], deadline: float) -> None:
        gone_since: float | None = None
        while task.state not in ("succeeded", "failed"):
            rid = self.fabric.session_of(task.peer.key)
            now = trio.current_time()
            if rid is None:
                gone_since = gone_since if gone_since is not None else now
                if now - gone_since > self.settings.seed_wait:
                    why = f"{task.peer.kind} {task.peer.hostname} ({task.peer.ip}) is not connected to the manager"
                    self._end(running, task, "failed", why, "peer_gone")
                    return
            elif rid != task.rid:
                gone_since = None
                task.rid = rid
                remaining = deadline - now
                msg = MgrPreheat(
                    job_id=running.job_id,
                    task=task.index,
                    url=task.url,
                    headers=headers,
                    tag=args.tag,
                    application=args.application,
                    filtered_query_params=_filters(args.filtered_query_params),
                    piece_length=args.piece_length or 0,
                    timeout_ms=0 if math.isinf(remaining) else max(1, min(86_400_000, int(remaining * 1000))),
                )
                if not await self.fabric.push_to(rid, msg):
                    task.rid = None
                else:
                    task.state = "running" if task.state == "pending" else task.state
                    running.changed.set()
                    event(log, logging.INFO, "mgr_preheat_sent", job=running.job_id, task=task.index, peer=task.peer.key)
            with trio.move_on_after(0.5):
                await task.done.wait()

    def _end(self, running: _Running, task: Task, state: str, error: str, kind: str) -> None:
        task.state, task.error, task.error_kind = state, error, kind
        task.done.set()
        running.changed.set()

    def on_report(self, rid: bytes, msg: MgrTaskReport) -> bool:
        """A peer reports on a task (``fabric.py`` calls this); whether the task is still wanted."""
        running = self._running.get(msg.job_id)
        task = running.tasks.get(msg.task) if running is not None else None
        if running is None or task is None or task.rid != rid or task.state in ("succeeded", "failed"):
            return False
        task.task_id = msg.task_id or task.task_id
        task.content_length = msg.content_length
        task.bytes_done = msg.bytes_done
        task.bytes_from_origin, task.bytes_from_peers = msg.bytes_from_origin, msg.bytes_from_peers
        if msg.state == "running":
            task.state = "running"
            running.changed.set()
            return True
        event(log, logging.INFO, "mgr_preheat_task_ended", job=msg.job_id, task=msg.task, state=msg.state, error=msg.error or "-")
        self._end(running, task, msg.state, msg.error, msg.error_kind)
        return False

    # --- the result -----------------------------------------------------------------------------------------

    async def _saver(self, running: _Running) -> None:
        while True:
            await running.changed.wait()
            running.changed = trio.Event()
            try:
                await self._save(running)
            except SQLAlchemyError as e:
                event(log, logging.ERROR, "mgr_store_failed", job=running.job_id, error=repr(e)[:500])
            await trio.sleep(self.settings.save_interval)

    async def _save(self, running: _Running, state: str | None = None, error: str = "") -> None:
        result = _result(running, state)

        def write() -> None:
            with self.db.writing() as session:
                job = session.get(Job, running.job_id)
                if job is None:
                    return
                job.result = result
                now = utcnow()
                job.updated_at = now
                if state is not None:
                    job.state, job.error, job.finished_at = state, error[:1024], now
                session.add(job)

        await trio.to_thread.run_sync(write)

    async def _finish(self, running: _Running, state: str, error: str) -> None:
        with trio.CancelScope(shield=True):
            await self._save(running, state, error)
        level = logging.INFO if state == "succeeded" else logging.WARNING
        event(log, level, "mgr_job_finished", job=running.job_id, state=state, error=error or "-")


def _filters(text: str) -> list[str] | None:
    """Dragonfly's ``filtered_query_params`` (``&``-separated names) as a list; empty: the defaults."""
    names = [n.strip() for n in text.split("&") if n.strip()]
    return names[:64] or None


def _by_hash(peers: list[Peer], url: str) -> Peer:
    """The peer a URL goes to with ``single_seed_peer``: highest random weight, stable for the URL."""
    return max(peers, key=lambda p: hashlib.sha256(f"{p.key}\0{url}".encode()).digest())


def _result(running: _Running, state: str | None) -> dict[str, Any]:
    tasks = [running.tasks[i] for i in sorted(running.tasks)]
    by_cluster: dict[int, dict[str, Any]] = {}
    for t in tasks:
        fresh = {"scheduler_cluster_id": t.cluster_id, "success_tasks": [], "failure_tasks": []}
        entry = by_cluster.setdefault(t.cluster_id, fresh)
        if t.state == "succeeded":
            entry["success_tasks"].append({"url": t.url, "task_id": t.task_id, "hostname": t.peer.hostname, "ip": t.peer.ip})
        elif t.state == "failed":
            entry["failure_tasks"].append({"url": t.url, "hostname": t.peer.hostname, "ip": t.peer.ip, "description": t.error})
    dragonfly = {"succeeded": "SUCCESS", "failed": "FAILURE"}.get(state or "", "PENDING")
    errors = sorted({t.error for t in tasks if t.state == "failed" and t.error})
    return {
        "state": dragonfly,
        "job_states": [
            {
                "task_name": "preheat",
                "state": dragonfly,
                "error": "; ".join(errors)[:2000],
                "results": list(by_cluster.values()),
            }
        ],
        "tasks": [t.as_json() for t in tasks],
        **running.extra,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(),
    }

"""The manager's job runner: preheat, ``get_task`` and ``delete_task`` jobs run inside ``dfz mgr``,
asynchronously, in trio tasks.

Theory of operation:

* **Jobs are rows.** The REST API (``/api/v1/jobs``) and the open API (``/oapi/v1/jobs``) only insert a
  ``pending`` row. The runner looks for pending rows every ``poll`` seconds, claims one (``pending`` →
  ``running``, a conditional update, so two runners never both take it) and runs it in a task of its own,
  at most ``max_jobs`` at once. At start it first takes the rows left ``running`` by a manager that
  stopped or died: **a job resumes after a restart**, its finished tasks kept, the others sent again
  (a seed peer still downloading one joins its own download: the task id is the same).
* **A preheat is planned, then run.** Planning makes the job's URLs (a file: ``url``/``urls``; an image: the
  layer and config blobs of its manifest for the platform, ``oci.py``, each with its digest), the scheduler
  clusters (the job's, or all) and, per cluster, the peers by ``scope``: ``single_seed_peer`` one seed peer
  (chosen by the URL's hash, or the blob's digest's, so a URL or a blob keeps going to the same one),
  ``all_seed_peers`` every seed peer, ``all_peers`` every seed peer and every daemon session of the cluster,
  each narrowed by ``ips``, ``count`` or ``percentage``. The seed peers of a cluster are the active seed peers
  of the seed-peer clusters linked to it that hold a fabric session with this manager; the runner waits up to
  ``seed_wait`` for one to appear (after a restart they register again). A task is one URL on one peer.
* **A task is a push and reports.** The runner pushes ``mgr.preheat`` to the peer's session; the peer
  downloads into its cache through its schedulers (``Daemon.download``) and answers with ``mgr.task_report``
  requests. An image's blob with a ``sha256:`` digest goes with that ``digest`` (to a peer that lists
  ``mgr.preheat`` revision 2): the peer downloads it as the task named by the digest, the one its registry
  mirror makes for the blob (``protocol.md`` §13), so a pull through a mirror finds it. A peer whose session
  ends is waited for (``seed_wait``) and sent the push again on its new session; the job's ``timeout``
  (default ``default_timeout``) fails what is left.
* **Rate limit.** At most ``cluster_concurrency`` tasks run at once per scheduler cluster, across jobs.
* **The registry password** is sealed in the job's row (``sealing.py``) and opened only here, in memory, when
  the job runs; one that cannot be opened (the manager's key changed) fails the job, saying so.
* **``get_task`` and ``delete_task``** ask the schedulers instead of the peers: the task's id is given or
  computed from its URL, or from a blob's digest (a task named by its digest), as a daemon computes it
  (``TaskArgs.the_task_id``); every active scheduler of each of the job's clusters (all clusters when none is
  named) that holds a session with this manager is pushed ``mgr.get_task`` (which peers of the task it knows:
  host, address, state, pieces) or ``mgr.delete_task`` (it asks those peers' daemons to delete the task, then
  forgets it) and answers with ``mgr.task_peers`` / ``mgr.task_deleted`` requests. A scheduler whose session
  changes is asked again on its new session; the job's ``timeout`` (default ``task_timeout``) fails those that
  did not answer. A cluster with no connected scheduler (after ``seed_wait``) fails. The result has
  Dragonfly's shape: per cluster ``peers`` (``get_task``) or ``success_tasks`` / ``failure_tasks`` per host
  (``delete_task``).
* **Cancelling** (``POST /api/v1/jobs/{id}/cancel``) is a write to the job's row (``running`` →
  ``cancelled``); every ``poll`` the runner looks at the rows of the jobs it runs and cancels the trio tasks
  of those no longer ``running``, then records which tasks had finished in the result (the state stays
  ``cancelled``). A pending job is simply never claimed. Every write of the runner to a job's row is
  conditional on the row being ``running``, so a cancel and a job's end never overwrite each other.
* **The result** (JSON, saved at most every ``save_interval`` while it changes) has Dragonfly's shape,
  ``{"state", "job_states": [{"task_name", "state", "error", "results": [{"scheduler_cluster_id",
  "success_tasks", "failure_tasks"}]}]}``, plus dfz's own ``tasks`` (every task's state, bytes and error)
  and, for an image, ``image`` (its manifest digest, blob URLs and their digests). The job ends ``succeeded`` when every
  task did, ``failed`` otherwise, with ``error`` saying the first reasons.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import trio
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from ..log import event, get_logger
from ..tasks import InvalidPieceLength
from .db import Database
from .messages import (
    MgrDeleteTask,
    MgrGetTask,
    MgrPreheat,
    MgrTaskDeleted,
    MgrTaskPeers,
    MgrTaskReport,
)
from .models import Job, JobSchedulerCluster, SchedulerCluster, SeedPeer, SeedPeerClusterLink, utcnow
from .oci import DEFAULT_PLATFORM, ImageError, resolve_image
from .schemas import NS_PER_SECOND, PreheatArgs, TaskArgs
from .sealing import SealError, open_args

log = get_logger("mgr.jobs")

JOB_TYPES = ("preheat", "get_task", "delete_task")
"""The job types this runner runs (others stay pending for a runner that knows them)."""
_NAMED = re.compile(r"sha256:[0-9a-f]{64}")
"""The blob digests a preheat names tasks by: the ones the registry mirror serves (``mirror.py``)."""
MAX_ANSWER_RECORDS = 10_000
"""Most peers (or hosts) kept from one scheduler's answer; beyond, the answer is marked truncated."""


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
    task_timeout: float = 60.0
    """Seconds a ``get_task`` or ``delete_task`` job may run when its arguments give no ``timeout``."""


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
    digest: str = ""
    """``sha256:<hex>``: an image's blob, downloaded as the task named by this digest (§13); empty: by URL."""
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
            "digest": self.digest,
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
class _Ask:
    """One question of a ``get_task`` or ``delete_task`` job to one scheduler."""

    request: int
    cluster_id: int
    scheduler_id: int
    hostname: str
    ip: str
    state: str = "pending"
    """``pending``, ``asked``, ``answered`` or ``failed``."""
    error: str = ""
    rid: bytes | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def key(self) -> str:
        return f"scheduler:{self.scheduler_id}"

    def as_json(self) -> dict[str, Any]:
        return {
            "scheduler_cluster_id": self.cluster_id,
            "id": self.scheduler_id,
            "hostname": self.hostname,
            "ip": self.ip,
            "state": self.state,
            "error": self.error,
            "records": len(self.records),
            "truncated": self.truncated,
        }


@dataclass
class _Running:
    job_id: int
    type: str = "preheat"
    tasks: dict[int, Task] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    extra: dict[str, Any] = field(default_factory=dict)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    """Around the job's work: cancelled when the job's row is no longer ``running`` (cancelled)."""
    asks: dict[int, _Ask] = field(default_factory=dict)
    """A task job's questions, by request number."""
    clusters: list[int] = field(default_factory=list)
    failed_clusters: dict[int, str] = field(default_factory=dict)
    """Clusters that could not be asked at all, and why."""


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
        self._requests = 0
        fabric.on_task_report = self.on_report
        fabric.on_task_answer = self.on_answer

    # --- the loop -----------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

    async def run(self, *, task_status: trio.TaskStatus[JobRunner] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            resumed = await trio.to_thread.run_sync(self._running_ids)
            for job_id in resumed:
                event(log, logging.INFO, "mgr_job_resumed", job=job_id)
                nursery.start_soon(self._run_job, job_id)
            task_status.started(self)
            while True:
                try:
                    await self._watch_cancelled()
                    waiting = await trio.to_thread.run_sync(self._pending, self.settings.max_jobs - len(self._running))
                    ready = [
                        job_id
                        for job_id, age, seeds, clusters in waiting
                        if age >= self.settings.seed_wait or self._reachable(seeds + self._scheduler_keys(clusters))
                    ]
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

    def _reachable(self, keys: list[str]) -> bool:
        return any(self.fabric.session_of(key) is not None for key in keys)

    def _scheduler_keys(self, clusters: list[int]) -> list[str]:
        return [f"scheduler:{sid}" for cid in clusters for sid, _, _ in self.fabric.schedulers_of(cid)]

    async def _watch_cancelled(self) -> None:
        """Cancel the work of the jobs run here whose rows are no longer ``running`` (cancelled, or gone)."""
        ids = [job_id for job_id, r in self._running.items() if not r.scope.cancel_called]
        if not ids:
            return
        states = await trio.to_thread.run_sync(self._states, ids)
        for job_id in ids:
            running = self._running.get(job_id)
            if running is not None and states.get(job_id) != "running":
                event(log, logging.INFO, "mgr_job_cancelling", job=job_id, state=states.get(job_id, "gone"))
                running.scope.cancel()

    def _states(self, ids: list[int]) -> dict[int, str]:
        with self.db.reading() as session:
            rows = session.exec(select(Job.id, Job.state).where(col(Job.id).in_(ids)))
            return {i: s for i, s in rows if i is not None}

    def _pending(self, room: int) -> list[tuple[int, float, list[str], list[int]]]:
        """Up to ``room`` pending jobs: id, age in seconds, the seed peers of their clusters (a preheat) or
        their clusters (a task job: their schedulers are looked up in memory). A job stays pending until one
        of them is connected (or ``seed_wait`` passed: then it runs, and says what is missing)."""
        if room <= 0:
            return []
        out: list[tuple[int, float, list[str], list[int]]] = []
        with self.db.reading() as session:
            jobs = session.exec(
                select(Job).where(Job.state == "pending", col(Job.type).in_(JOB_TYPES)).order_by(col(Job.id)).limit(room)
            )
            rows = [(j.id, j.created_at) for j in jobs if j.id is not None]
        now = utcnow()
        for job_id, created in rows:
            try:
                job, wanted, clusters = self._load(job_id)
            except JobFailed:
                continue  # deleted meanwhile
            ids = [cid for cid, _ in clusters if not wanted or cid in wanted]
            age = (now - created).total_seconds()
            if job.type == "preheat":
                out.append((job_id, age, [p.key for cid in ids for p in self._seed_peers(cid)], []))
            else:
                out.append((job_id, age, [], ids))
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
            with running.scope:
                async with self._jobs:
                    job, wanted, clusters = await trio.to_thread.run_sync(self._load, running.job_id)
                    running.type = job.type
                    if job.type == "preheat":
                        await self._preheat(running, job, wanted, clusters)
                    else:
                        await self._task_job(running, job, wanted, clusters)
            if running.scope.cancelled_caught:
                await self._cancelled(running)
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

    async def _preheat(self, running: _Running, job: Job, wanted: list[int], clusters: list[tuple[int, str]]) -> None:
        try:
            args = PreheatArgs.model_validate(open_args(job.args, self.db.sealer))
        except SealError as e:
            raise JobFailed(f"cannot open the job's registry password: {e}; create the job again") from None
        except ValueError as e:
            raise JobFailed(f"the job's arguments are not a preheat's: {e}") from None
        started = job.started_at or utcnow()
        timeout = args.timeout / NS_PER_SECOND if args.timeout else self.settings.default_timeout
        deadline = trio.current_time() + max(0.0, timeout - (utcnow() - started).total_seconds())
        cluster_ids = [cid for cid, _ in clusters if not wanted or cid in wanted]
        if not cluster_ids:
            raise JobFailed("no scheduler cluster to preheat in" + (f" (asked: {wanted})" if wanted else ""))
        event(log, logging.INFO, "mgr_job_started", job=job.id, kind=args.type, clusters=",".join(map(str, cluster_ids)))

        headers = dict(args.headers)
        digests: dict[str, str] = {}
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
            # A blob the mirror would name by its digest (sha256) is preheated as that task (§13).
            digests = {u: d for u, d in zip(image.blobs, image.digests, strict=True) if _NAMED.fullmatch(d)}
            platform = args.platform or DEFAULT_PLATFORM
            running.extra["image"] = {
                "manifest_digest": image.manifest_digest,
                "platform": platform,
                "blobs": urls,
                "digests": image.digests,
            }
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
                # A blob named by its digest goes to the seed peer of its digest: one copy of a layer that
                # several images (repositories, registries) share.
                chosen = [_by_hash(peers, digests.get(url, url))] if args.scope == "single_seed_peer" else peers
                for peer in chosen:
                    if (url, peer.key) in seen:
                        continue
                    seen.add((url, peer.key))
                    task = Task(len(plan), url, cid, peer, digest=digests.get(url, ""))
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
                # The digest only to a peer that knows it (revision 2): an older one would fetch by URL anyway.
                named = task.digest if self.fabric.revision(rid, MgrPreheat) >= 2 else ""
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
                    digest=named,
                )
                if not await self.fabric.push_to(rid, msg):
                    task.rid = None
                else:
                    task.state = "running" if task.state == "pending" else task.state
                    running.changed.set()
                    event(
                        log,
                        logging.INFO,
                        "mgr_preheat_sent",
                        job=running.job_id,
                        task=task.index,
                        peer=task.peer.key,
                        digest=named or "-",
                    )
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
        if running is None or task is None or task.rid != rid or task.state in ("succeeded", "failed", "cancelled"):
            return False
        if running.scope.cancel_called:
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

    # --- get_task and delete_task -------------------------------------------------------------------------

    async def _task_job(self, running: _Running, job: Job, wanted: list[int], clusters: list[tuple[int, str]]) -> None:
        try:
            args = TaskArgs.model_validate(job.args)
            task_id = args.the_task_id()
        except (ValueError, InvalidPieceLength) as e:
            raise JobFailed(f"the job's arguments are not a {job.type}'s: {e}") from None
        started = job.started_at or utcnow()
        timeout = args.timeout / NS_PER_SECOND if args.timeout else self.settings.task_timeout
        deadline = trio.current_time() + max(0.0, timeout - (utcnow() - started).total_seconds())
        cluster_ids = [cid for cid, _ in clusters if not wanted or cid in wanted]
        if not cluster_ids:
            raise JobFailed("no scheduler cluster to ask" + (f" (asked: {wanted})" if wanted else ""))
        running.clusters = cluster_ids
        running.extra["task_id"] = task_id
        event(
            log,
            logging.INFO,
            "mgr_job_started",
            job=job.id,
            kind=job.type,
            task=task_id,
            clusters=",".join(map(str, cluster_ids)),
        )
        until = min(deadline, trio.current_time() + self.settings.seed_wait)
        for cid in cluster_ids:
            schedulers = await self._connected_schedulers(cid, until)
            if not schedulers:
                running.failed_clusters[cid] = f"no scheduler of scheduler cluster {cid} is connected to the manager"
                continue
            for sid, hostname, ip in schedulers:
                self._requests = self._requests % (2**32 - 1) + 1
                running.asks[self._requests] = _Ask(self._requests, cid, sid, hostname, ip)
        await self._save(running)
        async with trio.open_nursery() as nursery:
            for ask in running.asks.values():
                nursery.start_soon(self._ask, running, ask, task_id, deadline)
            nursery.start_soon(self._saver, running)
            for ask in list(running.asks.values()):
                await ask.done.wait()
            nursery.cancel_scope.cancel()
        errors = [why for _, why in sorted(running.failed_clusters.items())]
        errors += [f"scheduler {a.hostname} ({a.ip}): {a.error}" for a in running.asks.values() if a.state != "answered"]
        if job.type == "delete_task":
            failed = [r for a in running.asks.values() for r in a.records if not r.get("ok")]
            errors += sorted({f"{r['hostname']} ({r['ip']}): {r['error']}" for r in failed})
        if errors:
            await self._finish(running, "failed", "; ".join(errors)[:1000])
        else:
            await self._finish(running, "succeeded", "")

    async def _connected_schedulers(self, cluster_id: int, until: float) -> list[tuple[int, str, str]]:
        """The active schedulers of ``cluster_id`` holding a session with this manager, waiting until ``until``
        for one (after a restart they register again)."""
        while True:
            found = [s for s in self.fabric.schedulers_of(cluster_id) if self.fabric.session_of(f"scheduler:{s[0]}")]
            if found or trio.current_time() >= until:
                return found
            await trio.sleep(0.2)

    async def _ask(self, running: _Running, ask: _Ask, task_id: str, deadline: float) -> None:
        """Push the question to the scheduler's session (again on a new session) until it answered, its
        session is gone for ``seed_wait``, or ``deadline``."""
        gone_since: float | None = None
        with trio.move_on_at(deadline):
            while not ask.done.is_set():
                rid = self.fabric.session_of(ask.key)
                now = trio.current_time()
                if rid is None:
                    gone_since = gone_since if gone_since is not None else now
                    if now - gone_since > self.settings.seed_wait:
                        self._ask_ended(running, ask, "failed", "the scheduler is not connected to the manager")
                        return
                elif rid != ask.rid:
                    gone_since = None
                    ask.rid, ask.records, ask.truncated = rid, [], False
                    msg: MgrGetTask | MgrDeleteTask
                    if running.type == "get_task":
                        msg = MgrGetTask(job_id=running.job_id, request=ask.request, task_id=task_id)
                    else:
                        # The scheduler waits for its daemons a little less than the job has, so its answer arrives.
                        budget = max(1.0, min(3600.0, (deadline - now) * 0.8))
                        msg = MgrDeleteTask(
                            job_id=running.job_id, request=ask.request, task_id=task_id, timeout_ms=int(budget * 1000)
                        )
                    if not self.fabric.understands(rid, type(msg)):
                        self._ask_ended(running, ask, "failed", f"the scheduler does not know {msg.wire_name()} (protocol < 1.8)")
                        return
                    if await self.fabric.push_to(rid, msg):
                        ask.state = "asked"
                        running.changed.set()
                        event(
                            log,
                            logging.INFO,
                            "mgr_task_question_sent",
                            job=running.job_id,
                            scheduler=ask.scheduler_id,
                            type=msg.wire_name(),
                        )
                    else:
                        ask.rid = None
                with trio.move_on_after(0.5):
                    await ask.done.wait()
        if not ask.done.is_set():
            self._ask_ended(running, ask, "failed", "no answer before the job's timeout")

    def _ask_ended(self, running: _Running, ask: _Ask, state: str, error: str) -> None:
        ask.state, ask.error = state, error
        ask.done.set()
        running.changed.set()

    def on_answer(self, rid: bytes, msg: MgrTaskPeers | MgrTaskDeleted) -> bool:
        """A scheduler answers a question (``fabric.py`` calls this); whether more of the answer is wanted."""
        running = self._running.get(msg.job_id)
        ask = running.asks.get(msg.request) if running is not None else None
        if running is None or ask is None or ask.rid != rid or ask.done.is_set():
            return False
        wanted = (running.type == "get_task") == isinstance(msg, MgrTaskPeers)
        if not wanted or msg.task_id != running.extra.get("task_id"):
            self._ask_ended(running, ask, "failed", f"the scheduler answered with a wrong {msg.wire_name()}")
            return False
        if isinstance(msg, MgrTaskPeers):
            records = [
                {
                    "id": p.peer_id,
                    "host_id": p.host_id,
                    "hostname": p.hostname,
                    "ip": p.ip,
                    "host_type": p.host_type,
                    "state": p.state,
                    "finished_pieces": p.finished_pieces,
                    "piece_count": p.piece_count,
                    "content_length": p.content_length,
                    "scheduler_id": ask.scheduler_id,
                }
                for p in msg.peers
            ]
        else:
            records = [
                {
                    "host_id": h.host_id,
                    "hostname": h.hostname,
                    "ip": h.ip,
                    "host_type": h.host_type,
                    "ok": h.ok,
                    "held": h.held,
                    "error": h.error,
                    "scheduler_id": ask.scheduler_id,
                }
                for h in msg.hosts
            ]
        room = MAX_ANSWER_RECORDS - len(ask.records)
        ask.records.extend(records[: max(0, room)])
        ask.truncated = ask.truncated or len(records) > room
        running.changed.set()
        if msg.more and not ask.truncated:
            return True
        event(log, logging.INFO, "mgr_task_answered", job=msg.job_id, scheduler=ask.scheduler_id, records=len(ask.records))
        self._ask_ended(running, ask, "answered", "")
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

    async def _save(self, running: _Running, state: str | None = None, error: str = "") -> bool:
        """Write the job's result (and, with ``state``, its end) if its row is still ``running`` (a job
        cancelled meanwhile keeps its state; :meth:`_cancelled` writes its result). Whether it was written."""
        result = _result(running, state) if running.type == "preheat" else _task_result(running, state)

        def write() -> bool:
            now = utcnow()
            values: dict[str, Any] = {"result": result, "updated_at": now}
            if state is not None:
                values.update(state=state, error=error[:1024], finished_at=now)
            with self.db.writing() as session:
                done = session.execute(
                    sa.update(Job).where(col(Job.id) == running.job_id, col(Job.state) == "running").values(**values)
                )
                return bool(done.rowcount == 1)  # type: ignore[attr-defined]

        return await trio.to_thread.run_sync(write)

    async def _finish(self, running: _Running, state: str, error: str) -> None:
        with trio.CancelScope(shield=True):
            written = await self._save(running, state, error)
        if not written:
            return  # cancelled meanwhile (or deleted): the row says so already
        level = logging.INFO if state == "succeeded" else logging.WARNING
        event(log, level, "mgr_job_finished", job=running.job_id, state=state, error=error or "-")

    async def _cancelled(self, running: _Running) -> None:
        """The job was cancelled (its row says so): record what had finished in its result."""
        for task in running.tasks.values():
            if task.state not in ("succeeded", "failed"):
                task.state = "cancelled"
        for ask in running.asks.values():
            if not ask.done.is_set():
                ask.state, ask.error = "cancelled", "the job was cancelled"
        result = _result(running, "cancelled") if running.type == "preheat" else _task_result(running, "cancelled")

        def write() -> None:
            with self.db.writing() as session:
                session.execute(
                    sa.update(Job)
                    .where(col(Job.id) == running.job_id, col(Job.state) == "cancelled")
                    .values(result=result, updated_at=utcnow())
                )

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(write)
        done = sum(1 for t in running.tasks.values() if t.state == "succeeded")
        event(log, logging.INFO, "mgr_job_cancelled", job=running.job_id, tasks_done=done, tasks=len(running.tasks))


def _filters(text: str) -> list[str] | None:
    """Dragonfly's ``filtered_query_params`` (``&``-separated names) as a list; empty: the defaults."""
    names = [n.strip() for n in text.split("&") if n.strip()]
    return names[:64] or None


def _by_hash(peers: list[Peer], name: str) -> Peer:
    """The peer a URL (or a blob's digest) goes to with ``single_seed_peer``: highest random weight, stable
    for the name."""
    return max(peers, key=lambda p: hashlib.sha256(f"{p.key}\0{name}".encode()).digest())


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
    dragonfly = _DRAGONFLY.get(state or "", "PENDING")
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


_DRAGONFLY = {"succeeded": "SUCCESS", "failed": "FAILURE", "cancelled": "FAILURE"}


def _task_result(running: _Running, state: str | None) -> dict[str, Any]:
    """A ``get_task`` or ``delete_task`` job's result, in Dragonfly's shape (see the module's docstring)."""
    dragonfly = _DRAGONFLY.get(state or "", "PENDING")
    asks = sorted(running.asks.values(), key=lambda a: (a.cluster_id, a.scheduler_id))
    results: list[dict[str, Any]] = []
    errors = [why for _, why in sorted(running.failed_clusters.items())]
    errors += [f"scheduler {a.hostname} ({a.ip}): {a.error}" for a in asks if a.error]
    for cid in running.clusters:
        mine = [a for a in asks if a.cluster_id == cid]
        if running.type == "get_task":
            peers: dict[str, dict[str, Any]] = {}
            for ask in mine:
                for record in ask.records:
                    peers.setdefault(record["id"], record)
            results.append({"scheduler_cluster_id": cid, "peers": [peers[k] for k in sorted(peers)]})
        else:
            hosts: dict[str, dict[str, Any]] = {}
            for ask in mine:
                for record in ask.records:
                    if record["host_id"] not in hosts or not record["ok"]:
                        hosts[record["host_id"]] = record
            task_id = running.extra.get("task_id", "")
            success, failure = [], []
            for key in sorted(hosts):
                r = hosts[key]
                shown = {k: r[k] for k in ("host_id", "hostname", "ip", "host_type")}
                if r["ok"]:
                    success.append({**shown, "task_id": task_id, "held": r["held"]})
                else:
                    failure.append({**shown, "task_id": task_id, "description": r["error"]})
                    errors.append(f"{r['hostname']} ({r['ip']}): {r['error']}")
            results.append({"scheduler_cluster_id": cid, "success_tasks": success, "failure_tasks": failure})
    return {
        "state": dragonfly,
        "task_id": running.extra.get("task_id", ""),
        "job_states": [
            {"task_name": running.type, "state": dragonfly, "error": "; ".join(sorted(set(errors)))[:2000], "results": results}
        ],
        "schedulers": [a.as_json() for a in asks],
        "updated_at": dt.datetime.now(dt.UTC).isoformat(),
    }

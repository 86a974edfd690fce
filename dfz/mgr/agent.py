"""The client side of the manager's fabric endpoint, for the processes that talk to a manager: a scheduler
(``dfz sched --manager``), a seed peer (``dfz seed --manager``) and a daemon (as a host) register and keep
alive; a daemon (and a seed peer without ``--scheduler``) asks which schedulers serve it; all of them take
``mgr.config``.

One :class:`ManagerAgent` is one fabric session (``dfz/broker`` client) to the manager:

* **Register** (when ``registration`` is given) on every new session, then send ``mgr.keepalive`` every
  ``keepalive_ms`` the manager asked for. ``NOT_REGISTERED`` (the manager forgot the session) registers
  again; a refused registration (an unknown cluster, a bad value) is logged and tried again every
  :data:`RETRY` seconds: a configuration error is loud, and a fixed manager is picked up.
* **Ask for schedulers** (when ``lookup`` is given) on every new session, every ``refresh_ms`` the manager
  says, and soon after :meth:`ManagerAgent.wake_lookup` (a scheduler failed), at most once per
  :data:`MIN_LOOKUP_INTERVAL`. The reply goes to ``on_schedulers``.
* **Settings** from the registration reply, the lookup reply and every ``mgr.config`` push go to
  ``on_config(target, settings)``: a whole snapshot each time (a setting absent returns to the process's
  own value). Callbacks must not block; a callback that raises is logged and the agent goes on.
* **Jobs**: a daemon takes ``mgr.preheat`` (``on_preheat``) and reports with :meth:`ManagerAgent.report`; a
  scheduler takes ``mgr.get_task`` / ``mgr.delete_task`` (:meth:`ManagerAgent.on_push`,
  ``dfz/sched/mgrjobs.py``) and answers with :meth:`ManagerAgent.answer`.
* **Tenant tickets** (1.9): the registration reply's ``ticket`` and ``ticket_key``, and every fresh ticket a
  keepalive reply carries, go to ``on_ticket(ticket, key)`` (``key`` empty when it did not come with it). A
  ``TOKEN_REFUSED`` answer (the daemon's tenant token is unknown, revoked or expired) goes to
  ``on_token_refused(reason)``: the process decides what to do (a daemon stops; it never drops to no tenant).
* The manager being down never stops the process: everything is retried, and what the process has (its
  schedulers, its settings) stays as it is meanwhile.
"""

from __future__ import annotations

import logging
import platform
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import zmq

from ..broker import Client, ClientConfig, ConnectionLost, Message, RemoteError, RequestTimeout
from ..log import event, get_logger
from .messages import (
    MGR_CATALOGUE,
    MgrAlive,
    MgrConfig,
    MgrErrorCode,
    MgrKeepalive,
    MgrListSchedulers,
    MgrNoted,
    MgrPreheat,
    MgrRegister,
    MgrRegistered,
    MgrSchedulers,
    MgrTaskDeleted,
    MgrTaskPeers,
    MgrTaskReport,
)

M = TypeVar("M", bound=Message)

log = get_logger("mgr.agent")

RETRY = 5.0
"""Seconds between two registrations the manager refused."""
MIN_LOOKUP_INTERVAL = 1.0
"""Least seconds between two ``mgr.list_schedulers`` asked because schedulers failed."""
TIMEOUT = 5.0


def host_labels() -> tuple[str, str, str]:
    """This machine's operating system, platform (its distribution's id, when it says) and architecture, for
    a host's registration (``mgr.register`` kind ``host``): ``("linux", "debian", "x86_64")``."""
    system = platform.system().lower()[:64]
    try:
        distro = platform.freedesktop_os_release().get("ID", "")
    except OSError:
        distro = ""
    return system, distro[:64], platform.machine()[:64]


def local_hostname() -> str:
    """This machine's host name, as the manager accepts it (letters, digits, ``.``, ``_``, ``-``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:255].lstrip(".-") or "host"
    return name


class ManagerAgent:
    """See the module's docstring. Run it in a nursery (``await nursery.start(agent.run)``); cancel to stop."""

    def __init__(
        self,
        endpoint: str,
        *,
        name: str,
        on_config: Callable[[str, dict[str, Any]], None],
        registration: Callable[[], MgrRegister] | None = None,
        lookup: Callable[[], MgrListSchedulers] | None = None,
        on_schedulers: Callable[[MgrSchedulers], Awaitable[None]] | None = None,
        on_preheat: Callable[[MgrPreheat], None] | None = None,
        on_ticket: Callable[[bytes, bytes], None] | None = None,
        on_token_refused: Callable[[str], None] | None = None,
        heartbeat: float = 1.0,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.on_config = on_config
        self.registration = registration
        self.lookup = lookup
        self.on_schedulers = on_schedulers
        self.on_ticket = on_ticket
        self.on_token_refused = on_token_refused
        self.client = Client(
            MGR_CATALOGUE,
            endpoint,
            name=name,
            config=ClientConfig(heartbeat=heartbeat, timeout=TIMEOUT, reconnect_max=2.0),
            ctx=ctx,
            on_state=self._on_state,
        )
        self.client.on_push(MgrConfig, self._on_push)
        if on_preheat is not None:
            self.client.on_push(MgrPreheat, lambda msg, _payload: on_preheat(msg))
        self.registered: MgrRegistered | None = None
        """The last registration's reply, while it holds."""
        self.schedulers: MgrSchedulers | None = None
        """The last answer to ``mgr.list_schedulers``."""
        self.config: dict[str, dict[str, Any]] = {}
        """The last settings received, by target."""
        self._need_register = trio.Event()
        self._need_lookup = trio.Event()

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def report(self, msg: MgrTaskReport) -> bool:
        """Report on a job's task (``mgr.task_report``); whether the manager still wants it. A lost session or
        a manager that does not answer counts as wanted (the manager sends the task again if it needs to)."""
        try:
            return (await self.client.request(msg, timeout=TIMEOUT)).expect(MgrNoted).wanted
        except (ConnectionLost, RequestTimeout) as e:
            event(log, logging.WARNING, "mgr_agent_report_failed", job=msg.job_id, task=msg.task, error=str(e))
            return True
        except RemoteError as e:
            event(log, logging.WARNING, "mgr_agent_report_refused", job=msg.job_id, task=msg.task, code=e.code, error=e.reason)
            return True

    def on_push(self, msg_type: type[M], handler: Callable[[M], None]) -> None:
        """Call ``handler`` (synchronous, must not block) with every ``msg_type`` push of the manager: a
        scheduler's ``mgr.get_task`` and ``mgr.delete_task``. Register before :meth:`run`."""
        self.client.on_push(msg_type, lambda msg, _payload: handler(msg))

    async def answer(self, msg: MgrTaskPeers | MgrTaskDeleted) -> bool:
        """Send a job's answer (a scheduler's ``mgr.task_peers`` or ``mgr.task_deleted``); whether the manager
        wants more (``mgr.noted``). False when it could not be delivered: the manager asks again on the next
        session if it still needs the answer."""
        try:
            return (await self.client.request(msg, timeout=TIMEOUT)).expect(MgrNoted).wanted
        except (ConnectionLost, RequestTimeout, RemoteError) as e:
            event(log, logging.WARNING, "mgr_agent_answer_failed", type=msg.wire_name(), job=msg.job_id, error=str(e))
            return False

    def wake_lookup(self) -> None:
        """Ask for the schedulers again soon (one of them failed)."""
        self._need_lookup.set()

    async def run(self, *, task_status: trio.TaskStatus[ManagerAgent] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.client.run)
            if self.registration is not None:
                nursery.start_soon(self._register_loop)
            if self.lookup is not None:
                nursery.start_soon(self._lookup_loop)
            task_status.started(self)

    # --- callbacks from the client -----------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if state == "connected":
            self._need_register.set()
            self._need_lookup.set()
        elif state == "lost":
            self.registered = None
            event(log, logging.WARNING, "mgr_agent_lost", manager=self.endpoint)

    def _on_push(self, msg: MgrConfig, _payload: list[Any]) -> None:
        self._config(msg.target, msg.config, "push")

    def _config(self, target: str, config: dict[str, Any], source: str) -> None:
        if self.config.get(target) == config and source != "push":
            return
        self.config[target] = dict(config)
        event(log, logging.INFO, "mgr_agent_config", manager=self.endpoint, target=target, source=source, settings=len(config))
        try:
            self.on_config(target, dict(config))
        except Exception as e:
            event(log, logging.ERROR, "mgr_agent_config_failed", target=target, error=repr(e))

    # --- registration and keepalive ----------------------------------------------------------------------------

    async def _register_loop(self) -> None:
        assert self.registration is not None
        while True:
            await self._need_register.wait()
            self._need_register = trio.Event()
            msg = self.registration()
            try:
                reply = (await self.client.request(msg, timeout=TIMEOUT)).expect(MgrRegistered)
            except (ConnectionLost, RequestTimeout) as e:
                event(log, logging.WARNING, "mgr_agent_register_failed", manager=self.endpoint, error=str(e))
                if self.client.connected:
                    self._need_register.set()
                    await trio.sleep(0.5)
                continue
            except RemoteError as e:
                event(log, logging.ERROR, "mgr_agent_register_refused", manager=self.endpoint, code=e.code, error=e.reason)
                if e.code == MgrErrorCode.TOKEN_REFUSED:
                    self._token_refused(e.reason)
                await trio.sleep(RETRY)
                self._need_register.set()
                continue
            self.registered = reply
            event(
                log,
                logging.INFO,
                "mgr_agent_registered",
                manager=self.endpoint,
                kind=msg.kind,
                id=reply.instance_id,
                cluster=reply.cluster,
                cluster_id=reply.cluster_id,
            )
            target = "scheduler" if msg.kind == "scheduler" else "daemon"
            self._config(target, reply.config, "registration")
            self._ticket(reply.ticket, reply.ticket_key)
            await self._keepalive(reply.keepalive_ms / 1000)

    async def _keepalive(self, interval: float) -> None:
        """Keep the registration alive until it is lost (then return: the loop registers again when told)."""
        while True:
            with trio.move_on_after(interval):
                await self._need_register.wait()
                return  # a new session: register again
            try:
                alive = (await self.client.request(MgrKeepalive(), timeout=max(interval * 3, 1.0))).expect(MgrAlive)
            except (ConnectionLost, RequestTimeout):
                continue  # a reconnect sets _need_register
            except RemoteError as e:
                if e.code == MgrErrorCode.TOKEN_REFUSED:
                    event(log, logging.ERROR, "mgr_agent_token_refused", manager=self.endpoint, error=e.reason)
                    self._token_refused(e.reason)
                    continue
                if e.code == MgrErrorCode.NOT_REGISTERED:
                    event(log, logging.WARNING, "mgr_agent_forgotten", manager=self.endpoint)
                    self._need_register.set()
                    return
                event(log, logging.WARNING, "mgr_agent_keepalive_refused", manager=self.endpoint, code=e.code, error=e.reason)
                continue
            if alive.ticket:
                self._ticket(alive.ticket, b"")

    def _ticket(self, ticket: bytes, key: bytes) -> None:
        if self.on_ticket is None or not (ticket or key):
            return
        try:
            self.on_ticket(ticket, key)
        except Exception as e:
            event(log, logging.ERROR, "mgr_agent_ticket_failed", error=repr(e))

    def _token_refused(self, reason: str) -> None:
        if self.on_token_refused is None:
            return
        try:
            self.on_token_refused(reason)
        except Exception as e:
            event(log, logging.ERROR, "mgr_agent_ticket_failed", error=repr(e))

    # --- schedulers -------------------------------------------------------------------------------------------

    async def _lookup_loop(self) -> None:
        assert self.lookup is not None
        refresh = 30.0
        last = -float("inf")
        while True:
            with trio.move_on_after(refresh):
                await self._need_lookup.wait()
            self._need_lookup = trio.Event()
            wait = last + MIN_LOOKUP_INTERVAL - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            last = trio.current_time()
            try:
                reply = (await self.client.request(self.lookup(), timeout=TIMEOUT)).expect(MgrSchedulers)
            except (ConnectionLost, RequestTimeout, RemoteError) as e:
                event(log, logging.WARNING, "mgr_agent_lookup_failed", manager=self.endpoint, error=str(e))
                refresh = min(refresh, 2.0)
                continue
            refresh = reply.refresh_ms / 1000
            self.schedulers = reply
            event(
                log,
                logging.INFO,
                "mgr_agent_schedulers",
                manager=self.endpoint,
                cluster=reply.cluster,
                matched_by=reply.matched_by,
                schedulers=",".join(s.endpoint for s in reply.schedulers) or "-",
            )
            self._config("daemon", reply.config, "lookup")
            if self.on_schedulers is not None:
                try:
                    await self.on_schedulers(reply)
                except Exception as e:
                    event(log, logging.ERROR, "mgr_agent_schedulers_failed", error=repr(e))


def tcp_address(endpoints: list[str], advertise: str = "") -> tuple[str, int] | None:
    """The IP and port others reach the first tcp endpoint at (a wildcard host: this machine's address by
    name; ``advertise``, when given, replaces the host). None when no endpoint is tcp."""
    for endpoint in endpoints:
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://") :].rpartition(":")
            host = host.strip("[]")
            if advertise:
                host = advertise
            elif host in ("0.0.0.0", "*", "::", ""):
                try:
                    host = socket.gethostbyname(socket.gethostname())
                except OSError:
                    host = "127.0.0.1"
            try:
                return host, int(port)
            except ValueError:
                return None
    return None

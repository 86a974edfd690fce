"""Prometheus metrics of one dfz process (``dfz sched``, ``dfz daemon``/``dfz seed``, ``dfz mgr``).

Each process that is given ``metrics_listen`` (``--metrics-listen HOST:PORT``) serves ``GET /metrics`` in
Prometheus's text format on that address, with hypercorn's trio worker in the process's own trio run.

Theory of operation. A process keeps its counters where it always did (the fabric server's stats, the
scheduler's core and service stats, the piece server's stats, the daemon's totals); :class:`Metrics`
holds a registry (one per process object, never the global one, so that tests run several in one
interpreter) to which the process adds *collectors*: functions that read those values and return metric
families, called at each scrape. The scrape runs on the trio thread (the ASGI app runs in the process's
trio run), so a collector reads a consistent state without locks. Latencies that exist only as events
(a scheduling decision, a piece fetched, a REST request) are histograms observed where they happen.
``prometheus_client`` renders the format; its output passes ``promtool check metrics``
(``tests/test_metrics.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Histogram, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .log import get_logger

log = get_logger("metrics")

NAMESPACE = "dfz"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: from a scheduling decision (sub-millisecond) to a piece from a slow parent (seconds)."""
PROXY_BUCKETS = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0)
"""Seconds of a proxy request: a cached manifest (milliseconds) to a large blob downloaded for it (minutes)."""


class ListenError(Exception):
    """The metrics address cannot be bound."""


class _FnCollector(Collector):
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return list(self._fn())


class Metrics:
    """The metrics of one process: a registry, its collectors and histograms."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.registry = CollectorRegistry(auto_describe=False)

    def collector(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Add a function called at each scrape that returns metric families (see :func:`counter`,
        :func:`gauge`)."""
        self.registry.register(_FnCollector(fn))

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, doc, labelnames=labels, namespace=NAMESPACE, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def counter(name: str, doc: str, value: float | Mapping[Any, float], labels: Sequence[str] = ()) -> Metric:
    """A counter family ``dfz_<name>_total``: one value, or values by label values."""
    family = CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=list(labels))
    _fill(family, value)
    return family


def gauge(name: str, doc: str, value: float | Mapping[Any, float], labels: Sequence[str] = ()) -> Metric:
    """A gauge family ``dfz_<name>``: one value, or values by label values."""
    family = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=list(labels))
    _fill(family, value)
    return family


def _fill(family: CounterMetricFamily | GaugeMetricFamily, value: float | Mapping[Any, float]) -> None:
    if isinstance(value, Mapping):
        for label_values, v in sorted(value.items()):
            family.add_metric(list(label_values), float(v))
    else:
        family.add_metric([], float(value))


def fabric_metrics(stats: Any, sessions: int) -> Iterable[Metric]:
    """A fabric server's counters (``dfz.broker.ServerStats``) and its sessions."""
    yield counter("fabric_requests", "Requests the fabric server received.", stats.requests)
    yield counter("fabric_pushes_in", "Client pushes the fabric server received.", stats.pushes_in)
    yield counter("fabric_dropped_sends", "Replies or pushes the fabric server could not send.", stats.dropped_sends)
    bad = {(code,): n for code, n in stats.bad_frames.items()} or {("none",): 0}
    yield counter("fabric_bad_frames", "Malformed or refused frames, by kind.", bad, ["kind"])
    yield gauge("fabric_sessions", "Client sessions the fabric server holds.", sessions)


def proxy_metrics(stats: Any) -> Iterable[Metric]:
    """The proxy port's counters (``dfz.peer.proxy.server.ProxyStats``). Label values are bounded: routes,
    status classes, body and error sources are fixed sets (never a URL or a host)."""
    requests = {key: n for key, n in stats.requests.items()} or {("other", "none"): 0}
    yield counter("proxy_requests", "Requests the proxy port served, by route and status class.", requests, ["route", "status"])
    sent = {key: n for key, n in stats.body_bytes.items()} or {("other", "proxy"): 0}
    yield counter(
        "proxy_response_bytes",
        "Response body bytes the proxy port sent, by route and source (p2p: a dfz task; passthrough: the origin; "
        "proxy: its own error messages).",
        sent,
        ["route", "source"],
    )
    errors = {(source,): stats.errors.get(source, 0) for source in ("origin", "proxy", "daemon")}
    yield counter("proxy_errors", "Error responses of the proxy port, by X-Dfz-Error-Source.", errors, ["source"])
    yield counter("proxy_tunnel_bytes", "Bytes closed CONNECT tunnels carried, both ways (not intercepted).", stats.tunnel_bytes)
    yield gauge("proxy_connections", "Client connections to the proxy port open now.", stats.connections)
    yield gauge("proxy_tunnels", "CONNECT tunnels open now (intercepted ones included).", stats.tunnels)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free port) → (host, port); ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:9100 (port 0: any free port)")
    return host.strip("[]"), int(port)


async def serve(metrics: Metrics, listen: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``listen`` until cancelled; ``task_status`` gets the URL once bound."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    host, port = parse_listen(listen)
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = get_logger("metrics.http")
    config.errorlog.setLevel(logging.WARNING)
    try:
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as e:
        raise ListenError(f"cannot listen on {listen} (metrics): {e.strerror or e}") from None
    bound = sockets.insecure_sockets[0].getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}/metrics"
    inner = make_asgi_app(metrics.registry)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return
        while True:  # nothing to start or stop: acknowledge (else hypercorn logs a warning)
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    try:
        task_status.started(url)
        await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, sockets=sockets)  # type: ignore[arg-type]
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()

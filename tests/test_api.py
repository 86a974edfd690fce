"""The local API (dfz/peer/api.py, api.*), its client library and ``dfz get``, end to end.

A real :class:`ApiServer` on a real ipc socket, talked to by the real :class:`ApiClient` (or a bare fabric
client where a test counts pushes), and ``dfz get`` run as a real subprocess against it. The one stand-in
is :class:`ScriptedService`, a :class:`DownloadService` that follows the contract of dfz/peer/local.py
(progress, then exactly one final state; failures with error kinds; closing the iterator cancels) with
outcomes chosen by the URL's path; it stands in for the daemon, which is built alongside this API and
tested on its own. Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from dfz.broker import Client, ServerConfig
from dfz.peer.api import ApiServer, EndpointInUse, default_endpoint
from dfz.peer.api_client import EARLY_PUSHES, ApiClient, ApiRequestError, DaemonLost, DaemonUnreachable, open_api_client
from dfz.peer.api_messages import (
    API_CATALOGUE,
    ApiDownload,
    ApiDownloadStarted,
    ApiErrorCode,
    ApiList,
    ApiListSource,
    ApiProgress,
    ApiTasks,
    check_request,
)
from dfz.peer.local import CachedTask, DownloadRequest, DownloadState, Progress, TenantError
from dfz.peer.source import SourceAuthError, SourceEntry
from dfz.tasks import DEFAULT_FILTERED_QUERY_PARAMS, task_id

SIZE = 4000
PIECE = 1000
SHA = "sha256:" + "ab" * 32


class ScriptedService:
    """A DownloadService whose outcome is the URL's path: ``/ok`` (4 pieces from peers and the origin,
    written to the output), ``/cached`` (a local hit), ``/missing`` (origin 404), ``/digest`` (mismatch),
    ``/sched`` (scheduler unreachable), ``/slow`` (runs until its timeout, or forever), ``/stuck``
    (ignores its timeout), ``/burst`` (50 updates over about half a second), ``/crash`` (raises)."""

    def __init__(self) -> None:
        self.requests: list[DownloadRequest] = []
        self.closed: list[str] = []
        self.closed_changed = trio.Event()
        self.running = trio.Event()
        self.tasks: dict[str, CachedTask] = {}
        self.tenant = ""

    async def resolve(self, request: DownloadRequest) -> DownloadRequest:
        """As the daemon: its own tenant (``self.tenant``) scopes every request; another one is refused."""
        await trio.lowlevel.checkpoint()
        if request.tenant and request.tenant != self.tenant:
            raise TenantError(f"tenant {request.tenant!r}: this daemon is in tenant {self.tenant!r}", wrong=True)
        return dataclasses.replace(request, tenant=self.tenant)

    def download(self, request: DownloadRequest) -> AsyncIterator[Progress]:
        return self._download(request)

    async def _download(self, request: DownloadRequest) -> AsyncIterator[Progress]:
        self.requests.append(request)
        filters = DEFAULT_FILTERED_QUERY_PARAMS if request.filtered_query_params is None else request.filtered_query_params
        tid = task_id(request.url, tag=request.tag, application=request.application, filtered_query_params=filters)
        path = urlsplit(request.url).path
        done = Progress(tid, DownloadState.SUCCEEDED, SIZE, 4, 4, SIZE)
        try:
            yield Progress(tid, DownloadState.PENDING)
            if path == "/ok":
                for i in range(1, 5):
                    await trio.sleep(0.01)
                    yield Progress(tid, DownloadState.RUNNING, SIZE, 4, i, i * PIECE, (i // 2) * PIECE, (i - i // 2) * PIECE)
                if request.output is not None:
                    await trio.Path(request.output).write_bytes(b"x" * SIZE)
                yield Progress(tid, DownloadState.SUCCEEDED, SIZE, 4, 4, SIZE, 2 * PIECE, 2 * PIECE)
            elif path == "/cached":
                yield Progress(tid, DownloadState.SUCCEEDED, SIZE, 4, 4, SIZE, bytes_from_cache=SIZE)
            elif path == "/missing":
                yield Progress(
                    tid, DownloadState.FAILED, error=f"the origin answered 404 for {request.url}", error_kind="origin_not_found"
                )
            elif path == "/digest":
                yield Progress(tid, DownloadState.FAILED, error=f"expected {request.digest}", error_kind="digest_mismatch")
            elif path == "/sched":
                yield Progress(
                    tid, DownloadState.FAILED, error="the scheduler did not answer", error_kind="scheduler_unreachable"
                )
            elif path == "/slow":
                yield Progress(tid, DownloadState.RUNNING, SIZE, 4, 1, PIECE, PIECE)
                self.running.set()
                if request.timeout is None:
                    await trio.sleep_forever()
                await trio.sleep(request.timeout)
                yield Progress(tid, DownloadState.FAILED, error="did not finish in time", error_kind="timeout")
            elif path == "/stuck":
                await trio.sleep_forever()
            elif path == "/burst":
                for i in range(50):
                    await trio.sleep(0.01)
                    yield Progress(tid, DownloadState.RUNNING, 50, 50, i, i)
                yield Progress(tid, DownloadState.SUCCEEDED, 50, 50, 50, 50, 50)
            elif path == "/crash":
                raise RuntimeError("disk on fire")
            else:
                yield done
        finally:
            self.closed.append(path)
            self.closed_changed.set()
            self.closed_changed = trio.Event()

    def list_tasks(self) -> list[CachedTask]:
        return list(self.tasks.values())

    async def delete_task(self, task_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        return self.tasks.pop(task_id, None) is not None

    async def list_source(self, url: str, headers: tuple[tuple[str, str], ...]) -> list[SourceEntry]:
        """``/many/`` 2500 files; ``/escape/`` one entry outside it; ``/twice/`` one path twice; ``/flat``
        cannot be listed; ``/denied/`` is refused by the origin."""
        await trio.lowlevel.checkpoint()
        path = urlsplit(url).path
        if path == "/many/":
            return [SourceEntry(url=f"{url}d{i % 7}/file-{i:05}.bin", content_length=i) for i in range(2500)]
        if path == "/escape/":
            return [SourceEntry(url=f"{url}ok.txt"), SourceEntry(url=f"{url}%2e%2e/etc/passwd")]
        if path == "/twice/":
            return [SourceEntry(url=f"{url}a%20b"), SourceEntry(url=f"{url}a b")]
        if path == "/flat":
            raise NotImplementedError("this scheme has no directory listing")
        raise SourceAuthError(url, "the origin refused access (HTTP 403)")


@asynccontextmanager
async def serving(service: ScriptedService, directory: str, **kw: Any) -> AsyncIterator[ApiServer]:
    async with trio.open_nursery() as nursery:
        api: ApiServer = await nursery.start(ApiServer(service, [f"ipc://{directory}/api.sock"], **kw).run)
        yield api
        nursery.cancel_scope.cancel()


async def stopped_following(service: ScriptedService, server: ApiServer, path: str) -> None:
    """Wait until the service's iterator for ``path`` was closed and the server forgot the download."""
    while path not in service.closed:
        await service.closed_changed.wait()
    while server.downloads:
        await trio.testing.wait_all_tasks_blocked()


async def follow(api_endpoint: str, request: DownloadRequest) -> list[Progress]:
    async with open_api_client(api_endpoint) as api, api.download(request) as download:
        return [p async for p in download]


# --- the API in process ------------------------------------------------------------------------------


async def test_the_daemons_tenant_makes_the_task_id_and_another_is_refused(short_tmp: str) -> None:
    service = ScriptedService()
    service.tenant = "7"
    url = "http://origin.test/ok"
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server, open_api_client(server.endpoints[0]) as api:
            async with api.download(DownloadRequest(url=url, output=None)) as download:
                assert [p async for p in download][-1].state is DownloadState.SUCCEEDED
                assert download.task_id == task_id(url, tenant="7") != task_id(url)
            with pytest.raises(ApiRequestError) as e:
                async with api.download(DownloadRequest(url=url, output=None, tenant="8")) as download:
                    pass
            assert e.value.code == ApiErrorCode.BAD_TENANT and "tenant '7'" in e.value.reason
    assert [r.tenant for r in service.requests] == ["7"]


async def test_a_download_pushes_its_progress_and_ends_with_its_final_state(short_tmp: str) -> None:
    service = ScriptedService()
    service.tenant = "ten"
    output = os.path.join(short_tmp, "out.bin")
    request = DownloadRequest(
        url="http://origin.test/ok?X-Amz-Signature=abc&v=1",
        output=output,
        headers=(("Authorization", "Bearer t"), ("X-Trace", "1")),
        tag="t",
        application="app",
        tenant="ten",
        filtered_query_params=("v",),
        digest="SHA256:" + "AB" * 32,
        piece_length=65536,
        timeout=30.0,
        back_to_source=False,
    )
    with trio.fail_after(10):
        async with (
            serving(service, short_tmp) as server,
            open_api_client(server.endpoints[0]) as api,
            api.download(request) as download,
        ):
            seen = [p async for p in download]
            assert download.task_id == task_id(
                request.url, tag="t", application="app", tenant="ten", piece_length=65536, filtered_query_params=("v",)
            )
    assert seen[-1].state is DownloadState.SUCCEEDED
    assert [p.state for p in seen[:-1]] and all(p.state in (DownloadState.PENDING, DownloadState.RUNNING) for p in seen[:-1])
    assert (seen[-1].bytes_done, seen[-1].bytes_from_peers, seen[-1].bytes_from_origin) == (SIZE, 2 * PIECE, 2 * PIECE)
    assert await trio.Path(output).read_bytes() == b"x" * SIZE
    # Every field reached the service, the digest normalised.
    assert service.requests == [
        DownloadRequest(
            url=request.url,
            output=output,
            headers=request.headers,
            tag="t",
            application="app",
            tenant="ten",
            filtered_query_params=("v",),
            digest=SHA,
            piece_length=65536,
            timeout=30.0,
            back_to_source=False,
        )
    ]


async def test_progress_is_throttled_and_the_final_state_is_always_pushed(short_tmp: str) -> None:
    service = ScriptedService()
    pushes: list[ApiProgress] = []
    final = trio.Event()

    def on_progress(msg: ApiProgress, _: list[Any]) -> None:
        pushes.append(msg)
        if msg.state in ("succeeded", "failed", "cancelled"):
            final.set()

    with trio.fail_after(10):
        async with serving(service, short_tmp, progress_interval=0.1) as server, trio.open_nursery() as nursery:
            client = Client(API_CATALOGUE, server.endpoints[0])
            client.on_push(ApiProgress, on_progress)
            await nursery.start(client.run)
            reply = (await client.request(ApiDownload(url="http://origin.test/burst"))).expect(ApiDownloadStarted)
            await final.wait()
            nursery.cancel_scope.cancel()
    # 50 updates over about 0.5 s at most 10 per second: a handful of pushes, the final one last.
    assert 2 <= len(pushes) <= 10, [p.bytes_done for p in pushes]
    assert {p.download_id for p in pushes} == {reply.download_id}
    assert (pushes[-1].state, pushes[-1].bytes_done) == ("succeeded", 50)
    assert all(p.state != "succeeded" for p in pushes[:-1])


async def test_failures_end_with_the_services_error_kind(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server:
            endpoint = server.endpoints[0]
            for path, kind in [
                ("/missing", "origin_not_found"),
                ("/digest", "digest_mismatch"),
                ("/sched", "scheduler_unreachable"),
                ("/crash", "internal"),
            ]:
                last = (await follow(endpoint, DownloadRequest(f"http://origin.test{path}", "/tmp/x")))[-1]
                assert (last.state, last.error_kind) == (DownloadState.FAILED, kind), path
                assert last.error
            # The API server survived the crash and still serves.
            assert (await follow(endpoint, DownloadRequest("http://origin.test/cached", None)))[-1].bytes_from_cache == SIZE


async def test_bad_requests_are_refused_with_api_codes_before_the_service_sees_them(short_tmp: str) -> None:
    service = ScriptedService()
    ok = DownloadRequest("http://origin.test/ok", "/tmp/out")
    cases: list[tuple[DownloadRequest, int, str]] = [
        (DownloadRequest("http://origin.test/ok", "relative/out"), ApiErrorCode.BAD_OUTPUT, "absolute"),
        (
            DownloadRequest("ftp://origin.test/ok", "/tmp/out"),
            ApiErrorCode.UNSUPPORTED_SCHEME,
            "supported schemes: file, hdfs, hf, http, https, oci, s3",
        ),
        (DownloadRequest("origin.test/ok", "/tmp/out"), ApiErrorCode.UNSUPPORTED_SCHEME, "no scheme"),
        (DownloadRequest("http:///ok", "/tmp/out"), ApiErrorCode.BAD_URL, "no host"),
        (DownloadRequest("http://origin.test/a b", "/tmp/out"), ApiErrorCode.BAD_URL, "spaces"),
        (DownloadRequest(ok.url, ok.output, digest="md5:abc"), ApiErrorCode.BAD_DIGEST, "sha256"),
        (DownloadRequest(ok.url, ok.output, piece_length=100_000), ApiErrorCode.BAD_PIECE_LENGTH, "power of two"),
        (DownloadRequest(ok.url, ok.output, headers=(("Bad Name", "x"),)), ApiErrorCode.BAD_HEADER, "not valid"),
        (DownloadRequest(ok.url, ok.output, headers=(("X-A", "a\r\nX-Evil: 1"),)), ApiErrorCode.BAD_HEADER, "line break"),
        (DownloadRequest(ok.url, ok.output, piece_length=1), 422, "piece_length"),  # out of the wire bounds
    ]
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server, open_api_client(server.endpoints[0]) as api:
            for request, code, words in cases:
                with pytest.raises(ApiRequestError) as caught:
                    await api.download(request).start()
                assert caught.value.code == code, request
                assert words in caught.value.reason, caught.value.reason
    assert service.requests == []


async def test_cancel_stops_the_download_and_pushes_a_cancelled_state(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server, open_api_client(server.endpoints[0]) as api:
            download = api.download(DownloadRequest("http://origin.test/slow", "/tmp/x"))
            seen = []
            async for progress in download:
                seen.append(progress)
                if progress.state is DownloadState.RUNNING:
                    await download.cancel()
            assert seen[-1].state is DownloadState.CANCELLED
            assert seen[-1].bytes_done == PIECE  # the counters of the last progress are kept
            assert "/slow" in service.closed
            assert download.download_id is not None
            assert not await api.cancel(download.download_id)  # it has ended: nothing to cancel
            assert server.downloads == {}


async def test_a_client_that_leaves_cancels_its_downloads(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server:
            async with open_api_client(server.endpoints[0]) as api:
                download = api.download(DownloadRequest("http://origin.test/slow", "/tmp/x"))
                await download.start()
                await service.running.wait()
                assert len(server.downloads) == 1
            # The client left (bye) without cancelling: the server stops following its download.
            await stopped_following(service, server, "/slow")


async def test_the_server_enforces_the_timeout_of_a_service_that_does_not(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(10):
        async with serving(service, short_tmp, timeout_grace=0.1) as server:
            start = trio.current_time()
            seen = await follow(server.endpoints[0], DownloadRequest("http://origin.test/stuck", "/tmp/x", timeout=0.3))
            assert 0.3 <= trio.current_time() - start < 3
    assert (seen[-1].state, seen[-1].error_kind) == (DownloadState.FAILED, "timeout")
    assert "/stuck" in service.closed


async def test_a_session_has_a_bounded_number_of_downloads(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(10):
        async with (
            serving(service, short_tmp, max_downloads_per_session=1) as server,
            open_api_client(server.endpoints[0]) as api,
            api.download(DownloadRequest("http://origin.test/slow", "/tmp/x")),
        ):
            with pytest.raises(ApiRequestError) as caught:
                await api.download(DownloadRequest("http://origin.test/slow", "/tmp/y")).start()
            assert caught.value.code == ApiErrorCode.TOO_MANY_DOWNLOADS


async def test_list_comes_in_pages_and_delete_is_idempotent(short_tmp: str) -> None:
    service = ScriptedService()
    for i in range(300):
        tid = task_id(f"http://origin.test/{i}")
        service.tasks[tid] = CachedTask(tid, f"http://origin.test/{i}?" + "q" * 1000, 10 * i, i % 2 == 0, i, i, {"k": "v"})
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server, open_api_client(server.endpoints[0]) as api:
            listed = await api.list_tasks()
            assert listed == sorted(service.tasks.values(), key=lambda t: t.task_id)
            first = await api._client.request(ApiList(limit=1000))
            page = first.expect(ApiTasks)
            assert page.more and 0 < len(page.tasks) < 300  # 300 long URLs do not fit one reply
            victim = listed[0].task_id
            assert await api.delete_task(victim)
            assert not await api.delete_task(victim)
            assert victim not in {t.task_id for t in await api.list_tasks()}


async def test_the_socket_is_private_and_a_live_one_is_not_taken_over(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(10):
        async with serving(service, short_tmp) as server:
            path = server.endpoints[0].removeprefix("ipc://")
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with pytest.raises(EndpointInUse, match="another process serves"):
                await ApiServer(service, server.endpoints).run()


async def test_no_daemon_at_the_endpoint_is_reported_after_a_bounded_wait(short_tmp: str) -> None:
    with trio.fail_after(5):
        start = trio.current_time()
        with pytest.raises(DaemonUnreachable, match="no dfz daemon answered"):
            async with open_api_client(f"ipc://{short_tmp}/none.sock", connect_timeout=0.5):
                pass
        assert trio.current_time() - start < 3


async def test_a_daemon_that_goes_away_mid_download_is_reported(short_tmp: str) -> None:
    service = ScriptedService()
    endpoint = f"ipc://{short_tmp}/api.sock"
    server_scope = trio.CancelScope()

    async def run_server(task_status: trio.TaskStatus[ApiServer]) -> None:
        with server_scope:
            # Short heartbeats (the client adopts them from `welcome`) so the loss shows within 0.35 s.
            await ApiServer(service, [endpoint], config=ServerConfig(heartbeat=0.1)).run(task_status=task_status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)
            async with open_api_client(endpoint) as api:
                with pytest.raises(DaemonLost, match="lost the session"):
                    async for progress in api.download(DownloadRequest("http://origin.test/slow", "/tmp/x")):
                        if progress.state is DownloadState.RUNNING:
                            server_scope.cancel()
    assert "/slow" in service.closed


async def test_a_push_that_overtakes_its_reply_is_kept_for_the_download(short_tmp: str) -> None:
    api = ApiClient(f"ipc://{short_tmp}/none.sock")
    for n in range(EARLY_PUSHES + 1):
        api._on_progress(ApiProgress(download_id=f"d-{n}", task_id="t", state="running", bytes_done=n), [])
    api._on_progress(ApiProgress(download_id="d-1", task_id="t", state="succeeded", bytes_done=7), [])
    assert api._watch("d-0").latest is None  # the oldest was dropped to bound the buffer
    latest = api._watch("d-1").latest
    assert latest is not None and (latest.state, latest.bytes_done) == ("succeeded", 7)


def test_default_endpoint_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DFZ_ENDPOINT", "tcp://127.0.0.1:9")
    assert default_endpoint() == "tcp://127.0.0.1:9"
    monkeypatch.delenv("DFZ_ENDPOINT")
    monkeypatch.setenv("DFZ_DATA_DIR", str(tmp_path))
    assert default_endpoint() == f"ipc://{tmp_path}/api.sock"
    assert default_endpoint(tmp_path / "d") == f"ipc://{tmp_path}/d/api.sock"
    check_request(DownloadRequest("https://h/x", "/x", digest=SHA), ["http", "https"])


# --- dfz get as a subprocess -------------------------------------------------------------------------


async def dfz_get(*args: str, cwd: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DFZ_ENDPOINT", "DFZ_DATA_DIR")}
    done = await trio.run_process(
        [sys.executable, "-m", "dfz.cli", "get", *args], cwd=cwd, env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    return done.returncode, (done.stdout + done.stderr).decode()


async def test_dfz_get_exit_codes_against_a_live_api(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(30):
        async with serving(service, short_tmp) as server:
            ep = ["--endpoint", server.endpoints[0]]
            # Success, with -O relative to the working directory: a bar with the split, then a summary.
            code, out = await dfz_get("http://origin.test/ok", "-O", "out.bin", *ep, cwd=short_tmp)
            assert code == 0, out
            assert await trio.Path(short_tmp, "out.bin").read_bytes() == b"x" * SIZE
            assert service.requests[-1].output == os.path.join(short_tmp, "out.bin")
            assert "━" in out and "peers" in out and "origin" in out and "saved" in out, out
            code, out = await dfz_get("http://origin.test/cached", "-O", "c.bin", "--no-progress", *ep, cwd=short_tmp)
            assert (code, out) == (0, "")  # no bar, no summary
            code, out = await dfz_get("http://origin.test/missing", "-O", "m.bin", *ep, cwd=short_tmp)
            assert code == 3 and "404" in out and "what to do" in out, out
            code, out = await dfz_get("http://origin.test/digest", "-O", "d.bin", "--digest", SHA, *ep, cwd=short_tmp)
            assert code == 4 and "digest" in out, out
            assert service.requests[-1].digest == SHA
            code, out = await dfz_get(
                "http://origin.test/slow", "-O", "s.bin", "--timeout", "0.3", "--no-progress", *ep, cwd=short_tmp
            )
            assert code == 5 and "timeout" in out, out
            code, out = await dfz_get("http://origin.test/sched", "-O", "s.bin", *ep, cwd=short_tmp)
            assert code == 7 and "scheduler" in out, out
            code, out = await dfz_get("http://origin.test/crash", "-O", "x.bin", *ep, cwd=short_tmp)
            assert code == 1 and "disk on fire" in out, out
            headers = ["-H", "Authorization: Bearer t", "-H", "X-A:b", "--tag", "t", "--application", "a"]
            more = ["--filter-query-param", "v", "--piece-length", "4MiB", "--no-back-to-source"]
            code, out = await dfz_get(
                "http://origin.test/cached", "-O", "h.bin", *headers, *more, "--no-progress", *ep, cwd=short_tmp
            )
            assert code == 0, out
            last = service.requests[-1]
            assert last.headers == (("Authorization", "Bearer t"), ("X-A", "b"))
            assert (last.tag, last.application, last.piece_length, last.back_to_source) == ("t", "a", 4 * 1024 * 1024, False)
            assert last.filtered_query_params == (*DEFAULT_FILTERED_QUERY_PARAMS, "v")


async def test_dfz_get_without_a_daemon_and_with_bad_input(short_tmp: str) -> None:
    none = ["--endpoint", f"ipc://{short_tmp}/none.sock", "--connect-timeout", "0.5"]
    with trio.fail_after(20):
        code, out = await dfz_get("http://origin.test/ok", "-O", "out.bin", *none, cwd=short_tmp)
        assert code == 6 and "no dfz daemon" in out and "dfz daemon" in out, out
        bad = [
            (["http://origin.test/ok", "--digest", "md5:123"], "sha256:<64 hex digits>"),
            (["http://origin.test/ok", "-H", "Bad Header: x"], "not valid"),
            (["http://origin.test/ok", "-H", "no colon"], "Name: value"),
            (["ftp://origin.test/ok"], "supported schemes: file, hdfs, hf, http, https, oci, s3"),
            (["http://origin.test/ok", "--piece-length", "3M"], "power of two"),
        ]
        for args, words in bad:
            code, out = await dfz_get(*args, "-O", "out.bin", *none, cwd=short_tmp)
            assert code == 2 and words in out, (args, out)
        code, out = await dfz_get("http://origin.test/ok", "-O", "-", *none, cwd=short_tmp)
        assert code == 2 and "not supported" in out, out
    assert not await trio.Path(short_tmp, "out.bin").exists()


async def test_dfz_get_interrupted_exits_130_and_the_daemon_stops_following(short_tmp: str) -> None:
    service = ScriptedService()
    with trio.fail_after(15):
        async with serving(service, short_tmp) as server:
            args = ["get", "http://origin.test/slow", "-O", "s.bin", "--no-progress", "--endpoint", server.endpoints[0]]
            async with trio.open_nursery() as nursery:
                command = [sys.executable, "-m", "dfz.cli", *args]
                run = functools.partial(trio.run_process, command, cwd=short_tmp, check=False, capture_stderr=True)
                process: trio.Process = await nursery.start(run)
                await service.running.wait()
                process.send_signal(signal.SIGINT)
            assert process.returncode == 130
            await stopped_following(service, server, "/slow")


async def test_list_source_checks_every_entry_and_answers_in_pages(short_tmp: str) -> None:
    """api.list_source: the listing comes in pages under 64 KiB, in path order, cut at max_entries (truncated);
    an entry outside the URL (an encoded ../), a path listed twice, an unlistable scheme and an origin's
    refusal are errors with their codes; a cursor of another session or an unknown one is refused."""
    service = ScriptedService()
    async with serving(service, short_tmp) as server, open_api_client(server.endpoints[0]) as api:
        listing = await api.list_source("http://origin.test/many/", max_entries=100_000)
        assert len(listing.entries) == 2500 and not listing.truncated
        assert [e.path for e in listing.entries] == sorted(f"d{i % 7}/file-{i:05}.bin" for i in range(2500))
        first = listing.entries[0]
        assert first.url == "http://origin.test/many/d0/file-00000.bin" and first.size == 0
        cut = await api.list_source("http://origin.test/many/", max_entries=10)
        assert len(cut.entries) == 10 and cut.truncated
        for path, code in [
            ("/escape/", ApiErrorCode.BAD_LISTING),
            ("/twice/", ApiErrorCode.BAD_LISTING),
            ("/flat", ApiErrorCode.NOT_LISTABLE),
            ("/denied/", ApiErrorCode.LISTING_FAILED),
        ]:
            with pytest.raises(ApiRequestError) as caught:
                await api.list_source(f"http://origin.test{path}")
            assert caught.value.code == code, (path, caught.value)
        with pytest.raises(ApiRequestError) as caught:
            await api.list_source("ftp://origin.test/x/")
        assert caught.value.code == ApiErrorCode.UNSUPPORTED_SCHEME
        first_page = await api._request(ApiListSource(url="http://origin.test/many/", max_entries=100_000))
        assert first_page.cursor and 0 < len(first_page.entries) < 2500 and first_page.total == 2500
        async with open_api_client(server.endpoints[0]) as other:
            with pytest.raises(ApiRequestError) as caught:
                await other._request(ApiListSource(url="http://origin.test/many/", cursor=first_page.cursor))
            assert caught.value.code == ApiErrorCode.UNKNOWN_LISTING
        with pytest.raises(ApiRequestError) as caught:
            await api._request(ApiListSource(url="http://origin.test/many/", cursor="nothing:0"))
        assert caught.value.code == ApiErrorCode.UNKNOWN_LISTING

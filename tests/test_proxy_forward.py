"""The forward proxy (dfz/peer/proxy/forward.py, rules.py, tunnel.py, intercept.py) on the proxy port's
server, on real sockets with curl as the client: pass-through, routing to P2P, errors and their headers,
CONNECT tunnels, HTTPS interception with an operator CA, garbage. The daemon end to end (P2P from peers,
pip, apt, Maven) is in test_proxy_clients.py."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from e2e_helpers import Route as OriginRoute
from e2e_helpers import serve_origin
from proxy_helpers import CAFiles, curl, make_ca

from dfz.peer.config import ConfigError, DaemonConfig
from dfz.peer.local import DownloadRequest
from dfz.peer.proxy.forward import BadTarget, ForwardProxy, parse_target
from dfz.peer.proxy.intercept import CAError, CertificateAuthority
from dfz.peer.proxy.rules import (
    DEFAULT_CONNECT_ALLOW,
    ProxyPolicy,
    ProxyRule,
    Route,
    RuleError,
    end_to_end,
    looped,
    p2p_headers,
    rules_from_config,
    with_via,
)
from dfz.peer.proxy.server import Exchange, ProxyServer
from dfz.peer.proxy.tunnel import BadAuthority, parse_authority, splice

pytestmark = pytest.mark.timeout(60)

DATA = bytes(range(256)) * 40  # 10 KiB


# --- rules and headers (no I/O) ---------------------------------------------------------------------------


def test_rules_first_match_wins_and_default_is_pass_through() -> None:
    policy = ProxyPolicy(rules_from_config([{"regex": r"/private/", "direct": True}, r"\.whl$", {"regex": r"\.deb$"}]))
    assert policy.route("GET", "http://h/pkg/a.whl") is Route.P2P
    assert policy.route("GET", "http://h/pool/b.deb") is Route.P2P
    assert policy.route("GET", "http://h/private/a.whl") is Route.DIRECT  # the direct rule comes first
    assert policy.route("GET", "http://h/simple/") is Route.DIRECT  # no rule: pass through
    assert policy.route("HEAD", "http://h/pkg/a.whl") is Route.DIRECT  # only GET goes P2P
    assert policy.route("POST", "http://h/pkg/a.whl") is Route.DIRECT
    assert policy.route("GET", "http://h/pkg/a.whl", has_body=True) is Route.DIRECT
    assert ProxyPolicy().route("GET", "http://h/pkg/a.whl") is Route.DIRECT  # no rules: nothing P2P


def test_connect_allow_and_intercept_match_whole() -> None:
    policy = ProxyPolicy(connect_allow=r"(pypi\.org|127\.0\.0\.1):\d+", intercept=(r"files\.example",))
    assert policy.connect_allowed("pypi.org", 443)
    assert not policy.connect_allowed("evil-pypi.org", 443)
    assert not policy.connect_allowed("pypi.org.evil", 443)
    assert ProxyPolicy().connect_allowed("example.com", 443)
    assert not ProxyPolicy().connect_allowed("example.com", 22)
    assert policy.intercepted("files.example")
    assert not policy.intercepted("files.example.com")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("(", "not a valid regular expression"),
        ([{"regex": "a", "redirect": "b"}], "unknown key(s) redirect"),
        ([{"direct": True}], "regex missing"),
        ([{"regex": "a", "direct": "yes"}], "direct must be true or false"),
        ([""], "non-empty regular expression"),
        ([42], "a table"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(value: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="proxy_rules") as err:
        DaemonConfig.from_mapping({"data_dir": str(tmp_path), "proxy_rules": value})
    assert message in str(err.value)
    with pytest.raises(RuleError):
        rules_from_config(value)


def test_config_of_connect_and_interception(tmp_path: Path) -> None:
    base = {"data_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="proxy_connect_allow: '\\[' is not a valid"):
        DaemonConfig.from_mapping({**base, "proxy_connect_allow": "["})
    with pytest.raises(ConfigError, match=r"proxy_intercept\[0\]"):
        DaemonConfig.from_mapping({**base, "proxy_intercept": ["*"]})
    with pytest.raises(ConfigError, match="needs proxy_ca_cert and proxy_ca_key"):
        DaemonConfig.from_mapping({**base, "proxy_intercept": ["example"]})
    ca = make_ca(tmp_path / "ca", "operator")
    leaf = make_ca(tmp_path / "ca", "not-a-ca", ca=False)
    with pytest.raises(ConfigError, match="not a CA certificate"):
        DaemonConfig.from_mapping({**base, "proxy_ca_cert": str(leaf.cert), "proxy_ca_key": str(leaf.key)})
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        DaemonConfig.from_mapping({**base, "proxy_ca_cert": str(ca.cert), "proxy_ca_key": str(leaf.key)})
    with pytest.raises(ConfigError, match="cannot read"):
        DaemonConfig.from_mapping({**base, "proxy_ca_cert": str(tmp_path / "none.pem"), "proxy_ca_key": str(ca.key)})
    with pytest.raises(ConfigError, match="go together"):
        DaemonConfig.from_mapping({**base, "proxy_ca_cert": str(ca.cert)})
    good = DaemonConfig.from_mapping(
        {
            **base,
            "proxy_listen": "127.0.0.1:0",
            "proxy_rules": [{"regex": r"\.whl$"}],
            "proxy_intercept": "files",
            "proxy_ca_cert": str(ca.cert),
            "proxy_ca_key": str(ca.key),
        }
    )
    assert good.proxy_rules == (ProxyRule(r"\.whl$"),)
    assert good.proxy_intercept == ("files",)
    with pytest.raises(CAError, match="not a PEM certificate"):
        CertificateAuthority.load(ca.key, ca.key)


def test_rules_from_a_toml_file_and_flags_replacing_them(tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(
        'data_dir = "d"\nproxy_listen = "127.0.0.1:0"\nproxy_connect_allow = "pypi\\\\.org:443"\n'
        '[[proxy_rules]]\nregex = "/simple/"\ndirect = true\n'
        '[[proxy_rules]]\nregex = "\\\\.whl$"\n'
    )
    config = DaemonConfig.load(path)
    assert config.proxy_rules == (ProxyRule("/simple/", direct=True), ProxyRule(r"\.whl$"))
    assert config.proxy_policy().route("GET", "https://files.example/simple/x.whl") is Route.DIRECT
    assert config.proxy_policy().route("GET", "https://files.example/p/x.whl") is Route.P2P
    assert config.proxy_policy().connect_allowed("pypi.org", 443)
    flags = DaemonConfig.load(path, proxy_rules=(r"\.deb$",))
    assert flags.proxy_rules == (ProxyRule(r"\.deb$"),)


def test_hop_by_hop_headers_are_dropped_and_via_added() -> None:
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Authorization", b"Bearer t"),
        (b"Via", b"1.0 other"),
    ]
    kept = end_to_end(headers)
    assert [n for n, _ in kept] == [b"Host", b"Authorization", b"Via"]
    via = dict(with_via(kept))[b"via"]
    assert via == b"1.0 other, 1.1 dfz"
    assert not looped(kept)
    assert looped(with_via(kept))
    p2p = dict(p2p_headers([*headers, (b"Range", b"bytes=0-1"), (b"Accept-Encoding", b"gzip"), (b"User-Agent", b"pip")]))
    assert p2p == {"Authorization": "Bearer t", "User-Agent": "pip"}


def test_targets_and_authorities_are_validated() -> None:
    t = parse_target("http://Example.com:8080/a/b?c=d")
    assert (t.scheme, t.host, t.port, t.target) == ("http", "example.com", 8080, b"/a/b?c=d")
    assert parse_target("https://h").url == "https://h/"
    for bad in ("ftp://h/x", "http://user:pw@h/x", "http:///x", "http://h:99999/x", "http://h/a b", "http://h:0/"):
        with pytest.raises(BadTarget):
            parse_target(bad)
    assert parse_authority("PyPI.org:443") == ("pypi.org", 443)
    assert parse_authority("[::1]:8443") == ("::1", 8443)
    for bad in ("pypi.org", "pypi.org:0", "a/b:443", "[zz]:443", ":443", "h:443:1", "u@h:443"):
        with pytest.raises(BadAuthority):
            parse_authority(bad)


# --- on real sockets --------------------------------------------------------------------------------------


class RecordingTasks:
    """Stands in for the daemon's task responder when only the routing is under test: it records each
    request and answers from the bytes it is given (the P2P path itself is tested with real daemons)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests: list[DownloadRequest] = []

    async def __call__(self, exchange: Exchange, request: DownloadRequest) -> None:
        self.requests.append(request)
        await exchange.respond(200, [("X-From", "task")], self.body)


@asynccontextmanager
async def forward_proxy(
    policy: ProxyPolicy,
    *,
    tasks: RecordingTasks | None = None,
    ca: CertificateAuthority | None = None,
    origin_ca: CAFiles | None = None,
) -> AsyncIterator[str]:
    origin_tls = ssl.create_default_context(cafile=str(origin_ca.cert) if origin_ca else None)
    proxy = ForwardProxy(policy, tasks=tasks, origin_tls=origin_tls, ca=ca)
    server = ProxyServer("127.0.0.1:0", forward=proxy.forward, connect=proxy.connect)
    proxy.serve_stream = server.serve_stream
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server.url
        nursery.cancel_scope.cancel()


async def test_pass_through_relays_end_to_end_headers_and_bodies() -> None:
    with serve_origin({"/file.txt": OriginRoute(DATA)}) as origin:
        async with forward_proxy(ProxyPolicy()) as proxy:
            r = await trio.to_thread.run_sync(
                lambda: curl(
                    f"{origin.url}/file.txt",
                    "-H",
                    "Connection: X-Secret",
                    "-H",
                    "X-Secret: 1",
                    "-H",
                    "X-Keep: yes",
                    "--proxy-user",
                    "u:p",
                    proxy=proxy,
                )
            )
            assert (r.returncode, r.status, r.body) == (0, 200, DATA), r.stderr
            assert r.headers["via"].endswith("1.1 dfz")
            seen = {n.lower(): v for n, v in origin.headers["/file.txt"]}
            assert seen["x-keep"] == "yes"
            assert seen["via"] == "1.1 dfz"
            assert seen["host"] == origin.url.removeprefix("http://")
            assert "x-secret" not in seen and "proxy-authorization" not in seen and "proxy-connection" not in seen
            # A POST passes through with its body, and a Range is the origin's business.
            posted = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/echo", "--data-binary", "hello", proxy=proxy))
            assert (posted.status, posted.body) == (200, b"hello")
            ranged = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/file.txt", "-r", "10-19", proxy=proxy))
            assert (ranged.status, ranged.body) == (206, DATA[10:20])
            head = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/file.txt", "-I", proxy=proxy))
            assert (head.status, head.headers["content-length"]) == (200, str(len(DATA)))


async def test_rules_send_matching_gets_to_the_task_responder() -> None:
    tasks = RecordingTasks(b"from the swarm")
    policy = ProxyPolicy(rules_from_config([{"regex": r"/skip/", "direct": True}, r"\.bin$"]))
    with serve_origin({"/a.bin": OriginRoute(DATA), "/skip/a.bin": OriginRoute(DATA)}) as origin:
        async with forward_proxy(policy, tasks=tasks) as proxy:
            r = await trio.to_thread.run_sync(
                lambda: curl(f"{origin.url}/a.bin", "-H", "Authorization: Bearer tok", "-r", "0-3", proxy=proxy)
            )
            assert (r.status, r.body, r.headers["x-from"]) == (200, b"from the swarm", "task")
            assert [q.url for q in tasks.requests] == [f"{origin.url}/a.bin"]
            assert tasks.requests[0].output is None
            assert dict(tasks.requests[0].headers)["authorization"] == "Bearer tok"
            assert "range" not in dict(tasks.requests[0].headers)
            direct = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/skip/a.bin", proxy=proxy))
            assert (direct.status, direct.body) == (200, DATA)
            head = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/a.bin", "-I", proxy=proxy))
            assert "x-from" not in head.headers
            # Headers a task cannot carry over the fabric (a value over 4096 characters): passed through.
            big = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/a.bin", "-H", f"Cookie: {'c' * 5000}", proxy=proxy))
            assert (big.status, big.body) == (200, DATA)
            assert len(tasks.requests) == 1
            assert origin.requests == {"/skip/a.bin": 1, "/a.bin": 2}  # the HEAD and the big GET


async def test_errors_say_who_failed() -> None:
    with serve_origin({}) as origin:
        async with forward_proxy(ProxyPolicy()) as proxy:
            missing = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/nothing", proxy=proxy))
            assert missing.status == 404
            assert missing.headers["x-dfz-error-source"] == "origin"
            assert "404" in missing.headers["x-dfz-error"]
            with trio.socket.socket() as s:
                await s.bind(("127.0.0.1", 0))
                closed_port = s.getsockname()[1]
            down = await trio.to_thread.run_sync(lambda: curl(f"http://127.0.0.1:{closed_port}/x", proxy=proxy))
            assert down.status == 502
            assert down.headers["x-dfz-error-source"] == "origin"
            assert "cannot connect" in down.headers["x-dfz-error"]
            loop = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/x", "-H", "Via: 1.1 dfz", proxy=proxy))
            assert (loop.status, loop.headers["x-dfz-error-source"]) == (508, "proxy")


async def test_connect_tunnels_to_allowed_targets_only(tmp_path: Path) -> None:
    origin_ca = make_ca(tmp_path, "origin-ca")
    tls = CertificateAuthority.load(origin_ca.cert, origin_ca.key).server_context("127.0.0.1")
    with serve_origin({"/file": OriginRoute(DATA)}, tls=tls) as origin:
        policy = ProxyPolicy(connect_allow=r"127\.0\.0\.1:\d+")
        async with forward_proxy(policy) as proxy:
            r = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/file", "--cacert", str(origin_ca.cert), proxy=proxy))
            assert (r.returncode, r.status, r.body) == (0, 200, DATA), r.stderr
            assert "via" not in r.headers  # the proxy never saw inside the tunnel
        async with forward_proxy(ProxyPolicy()) as proxy:  # default: port 443 only
            refused = await trio.to_thread.run_sync(
                lambda: curl(f"{origin.url}/file", "--cacert", str(origin_ca.cert), "-v", proxy=proxy)
            )
            assert refused.returncode != 0
            assert "403" in refused.stderr
            assert origin.requests == {"/file": 1}


async def test_interception_applies_the_rules_inside_tls(tmp_path: Path) -> None:
    origin_ca = make_ca(tmp_path, "origin-ca")
    operator = make_ca(tmp_path, "operator-ca")
    ca = CertificateAuthority.load(operator.cert, operator.key)
    tls = CertificateAuthority.load(origin_ca.cert, origin_ca.key).server_context("127.0.0.1")
    tasks = RecordingTasks(b"swarm bytes")
    policy = ProxyPolicy(rules_from_config([r"\.bin$"]), connect_allow=r"127\.0\.0\.1:\d+", intercept=(r"127\.0\.0\.1",))
    with serve_origin({"/index.html": OriginRoute(DATA), "/w.bin": OriginRoute(DATA)}, tls=tls) as origin:
        async with forward_proxy(policy, tasks=tasks, ca=ca, origin_ca=origin_ca) as proxy:
            # The client trusts the operator's CA only: the leaf it sees was minted by the proxy.
            page = await trio.to_thread.run_sync(
                lambda: curl(f"{origin.url}/index.html", "--cacert", str(operator.cert), proxy=proxy)
            )
            assert (page.returncode, page.status, page.body) == (0, 200, DATA), page.stderr
            assert page.headers["via"] == "1.1 dfz"
            assert {n.lower(): v for n, v in origin.headers["/index.html"]}["via"] == "1.1 dfz"
            blob = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/w.bin", "--cacert", str(operator.cert), proxy=proxy))
            assert (blob.status, blob.body) == (200, b"swarm bytes")
            assert [q.url for q in tasks.requests] == [f"{origin.url}/w.bin"]
            # A client that trusts only the origin's CA refuses the proxy's certificate.
            distrust = await trio.to_thread.run_sync(
                lambda: curl(f"{origin.url}/index.html", "--cacert", str(origin_ca.cert), proxy=proxy)
            )
            assert distrust.returncode == 60  # curl: peer certificate cannot be authenticated
            assert origin.requests == {"/index.html": 1}


async def test_garbage_gets_400_and_the_proxy_keeps_serving() -> None:
    with serve_origin({"/ok": OriginRoute(DATA)}) as origin:
        async with forward_proxy(ProxyPolicy()) as proxy:
            port = int(proxy.rsplit(":", 1)[1])
            for raw, status in (
                (b"CONNECT nohost HTTP/1.1\r\nHost: x\r\n\r\n", 400),
                (b"CONNECT a/b:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
                (b"GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n", 404),  # not a form the proxy port serves
                (b"GET http://u:p@h/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
                (b"GET http://[::1/x HTTP/1.1\r\nHost: h\r\n\r\n", 400),
                (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n", 400),
            ):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(raw)
                    answer = b""
                    with trio.fail_after(10):
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                            if b"\r\n\r\n" in answer:
                                break
                assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (raw, answer[:200])
                assert b"x-dfz-error-source: proxy" in answer.lower()
            r = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/ok", proxy=proxy))
            assert (r.status, r.body) == (200, DATA)


# --- tunnels, certificates and the command line -----------------------------------------------------------


async def test_splice_copies_both_ways_passes_half_close_and_ends_when_idle() -> None:
    client_near, client_far = trio.testing.memory_stream_pair()
    target_near, target_far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        moved: list[int] = []

        async def run() -> None:
            moved.append(await splice(client_far, target_near, idle_timeout=30))

        nursery.start_soon(run)
        await client_near.send_all(b"hello target")
        assert await target_far.receive_some(100) == b"hello target"
        await target_far.send_all(b"hello client")
        assert await client_near.receive_some(100) == b"hello client"
        await client_near.send_eof()  # the client is done sending: the target hears EOF ...
        assert await target_far.receive_some(100) == b""
        await target_far.send_all(b"late answer")  # ... and may still answer
        assert await client_near.receive_some(100) == b"late answer"
        await target_far.send_eof()
        assert await client_near.receive_some(100) == b""
    assert moved == [len(b"hello target") + len(b"hello client") + len(b"late answer")]

    # Nothing moving: the tunnel ends by itself.
    _, quiet_far = trio.testing.memory_stream_pair()
    other_near, _ = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        assert await splice(quiet_far, other_near, idle_timeout=0.2) == 0


def test_leaf_certificates_name_the_host_and_chain_to_the_ca(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_ca(tmp_path, "operator")
    ca = CertificateAuthority.load(files.cert, files.key)
    dns = ca.leaf("files.example")
    dns.verify_directly_issued_by(ca.cert)
    names = dns.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["files.example"]
    assert not dns.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ip = ca.leaf("::1")
    addresses = ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert [str(a) for a in addresses] == ["::1"]
    assert ip.not_valid_after_utc <= ca.cert.not_valid_after_utc
    assert ca.server_context("files.example") is ca.server_context("files.example")  # minted once


def test_proxy_settings_without_the_proxy_port_are_refused(tmp_path: Path) -> None:
    """Each setting of the proxy port, from a mapping (a config file) or flags, without ``proxy_listen``: a
    configuration error that names the setting; with ``proxy_listen`` the same settings are taken."""
    ca = make_ca(tmp_path / "ca", "operator")
    settings: dict[str, object] = {
        "mirror_upstream": "http://127.0.0.1:5000",
        "proxy_rules": [r"\.whl$"],
        "proxy_connect_allow": r"pypi\.org:443",
        "proxy_intercept": ["files"],
        "proxy_ca_cert": str(ca.cert),
        "proxy_ca_key": str(ca.key),
    }
    base = {"data_dir": str(tmp_path)}
    ca_pair = {"proxy_ca_cert": str(ca.cert), "proxy_ca_key": str(ca.key)}
    for key, given in settings.items():
        mapping = {**base, key: given}
        if key in ("proxy_intercept", "proxy_ca_cert", "proxy_ca_key"):
            mapping |= ca_pair  # interception needs the CA, and its files go together
        with pytest.raises(ConfigError, match=rf"{key}.*settings of the proxy port.*set proxy_listen") as err:
            DaemonConfig.from_mapping(mapping)
        assert "--proxy-listen" in str(err.value)
        assert DaemonConfig.from_mapping({**mapping, "proxy_listen": "127.0.0.1:0"}).proxy_listen == "127.0.0.1:0"
    with pytest.raises(ConfigError, match="mirror_upstream, proxy_rules, proxy_connect_allow, proxy_intercept, proxy_ca_cert"):
        DaemonConfig.from_mapping({**base, **settings})
    everything = DaemonConfig.from_mapping({**base, **settings, "proxy_listen": "127.0.0.1:0"})
    assert everything.proxy_rules == (ProxyRule(r"\.whl$"),) and everything.mirror_upstream == "http://127.0.0.1:5000"
    # The default connect rule, given explicitly, is not a proxy setting of its own.
    assert DaemonConfig.from_mapping({**base, "proxy_connect_allow": DEFAULT_CONNECT_ALLOW}).proxy_listen == ""


def test_a_proxy_flag_without_proxy_listen_stops_the_daemon(tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "dfz.cli", "daemon", "--data-dir", str(tmp_path / "d"), "--scheduler", "tcp://127.0.0.1:1"]
    for flags in (["--proxy-rule", r"\.whl$"], ["--mirror-upstream", "http://127.0.0.1:5000"]):
        done = subprocess.run([*argv, *flags], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0
        assert "settings of the proxy port, which is off: set proxy_listen (--proxy-listen" in done.stderr, done.stderr


def test_bad_proxy_flags_stop_the_daemon_with_the_reason(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "dfz.cli", "daemon", "--data-dir", str(tmp_path / "d"), "--proxy-rule", "(unclosed"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "proxy_rules[0]: regex: '(unclosed' is not a valid regular expression" in done.stderr


async def test_http_1_0_clients_and_streamed_answers_pass_through() -> None:
    with serve_origin({"/chunked": OriginRoute(DATA, chunked=True), "/file": OriginRoute(DATA)}) as origin:
        async with forward_proxy(ProxyPolicy()) as proxy:
            old = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/chunked", "-0", proxy=proxy))
            assert (old.status, old.body) == (200, DATA)
            assert "transfer-encoding" not in old.headers  # an HTTP/1.0 client gets the body until close
            new = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/chunked", proxy=proxy))
            assert (new.status, new.body, new.headers["transfer-encoding"]) == (200, DATA, "chunked")
            # Keep-alive to the proxy: two URLs on one curl connection.
            both = await trio.to_thread.run_sync(lambda: curl(f"{origin.url}/file", f"{origin.url}/file", "-v", proxy=proxy))
            assert both.body.startswith(DATA) and both.body.endswith(DATA)  # the second head is in between
            assert "Re-using existing connection" in both.stderr


async def keep_alive_origin(nursery: trio.Nursery, counts: dict[str, int], *, close_after_each: bool, extra: bytes = b"") -> int:
    """A raw HTTP/1.1 origin that answers every request ``hello`` with a Content-Length (so the connection may
    be kept), counting connections and requests; with ``close_after_each`` it closes the connection after
    each answer without saying so (what an origin does to a connection it found idle too long)."""

    async def handler(stream: trio.SocketStream) -> None:
        counts["connections"] += 1
        buffer = b""
        async with stream:
            while data := await stream.receive_some(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    counts["requests"] += 1
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + extra + b"\r\nhello")
                    if close_after_each:
                        return

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@pytest.mark.parametrize("close_after_each", [False, True])
async def test_origin_connections_are_kept_alive_and_a_stale_one_is_replaced(close_after_each: bool) -> None:
    counts = {"connections": 0, "requests": 0}
    async with trio.open_nursery() as nursery:
        port = await keep_alive_origin(nursery, counts, close_after_each=close_after_each)
        async with forward_proxy(ProxyPolicy()) as proxy:
            for _ in range(3):  # three clients, one after another
                r = await trio.to_thread.run_sync(lambda: curl(f"http://127.0.0.1:{port}/x", proxy=proxy))
                assert (r.status, r.body) == (200, b"hello"), r.stderr
        nursery.cancel_scope.cancel()
    if close_after_each:
        # Each reuse found the connection closed, and the request went again on a new one.
        assert counts == {"connections": 3, "requests": 3}
    else:
        assert counts == {"connections": 1, "requests": 3}


async def test_garbage_inside_an_intercepted_tunnel_gets_400(tmp_path: Path) -> None:
    operator = make_ca(tmp_path, "operator-ca")
    ca = CertificateAuthority.load(operator.cert, operator.key)
    policy = ProxyPolicy(connect_allow=r"127\.0\.0\.1:\d+", intercept=(r"127\.0\.0\.1",))
    trust = ssl.create_default_context(cafile=str(operator.cert))
    async with forward_proxy(policy, ca=ca) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        for inner, status in (
            (b"\x00\x01garbage\r\n\r\n", b"400"),
            (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
            (b"GET http://elsewhere.example/x HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n", b"400"),
        ):
            with trio.fail_after(20):
                raw = await trio.open_tcp_stream("127.0.0.1", port)
                await raw.send_all(b"CONNECT 127.0.0.1:4443 HTTP/1.1\r\nHost: 127.0.0.1:4443\r\n\r\n")
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await raw.receive_some(1)  # byte by byte: nothing of the TLS that follows is read
                assert head.startswith(b"HTTP/1.1 200 ")
                tls = trio.SSLStream(raw, trust, server_hostname="127.0.0.1")
                async with tls:
                    await tls.send_all(inner)
                    answer = b""
                    while b"\r\n\r\n" not in answer and (chunk := await tls.receive_some(65536)):
                        answer += chunk
            assert answer.split(b" ", 2)[1] == status, (inner, answer[:300])
            assert b"x-dfz-error-source: proxy" in answer.lower()


async def test_an_origins_own_error_headers_are_not_relayed() -> None:
    counts = {"connections": 0, "requests": 0}
    async with trio.open_nursery() as nursery:
        spoof = b"X-Dfz-Error-Source: daemon\r\nX-Dfz-Error: made up\r\nX-Other: kept\r\n"
        port = await keep_alive_origin(nursery, counts, close_after_each=False, extra=spoof)
        async with forward_proxy(ProxyPolicy()) as proxy:
            r = await trio.to_thread.run_sync(lambda: curl(f"http://127.0.0.1:{port}/x", proxy=proxy))
        nursery.cancel_scope.cancel()
    assert (r.status, r.body, r.headers["x-other"]) == (200, b"hello", "kept")
    assert "x-dfz-error-source" not in r.headers and "x-dfz-error" not in r.headers

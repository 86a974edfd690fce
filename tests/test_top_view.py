"""``dfz top``'s view model and frame (dfz/top/view.py, dfz/top/render.py) and its sources and keys
(dfz/top/app.py), from snapshots built by hand: rates from counter differences, the tree, sorting,
merging hosts of several schedulers, cutting to the terminal, and checking what it reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dfz.sched.messages import InspectHost, InspectPeer, InspectTask, SchedSnapshot
from dfz.top.app import (
    TopError,
    apply_key,
    check_endpoint,
    parse_keys,
    print_once,
    read_cluster_json,
    resolve_sources,
)
from dfz.top.view import TopView, build_tree, human_rate

A, B = "tcp://127.0.0.1:1001", "tcp://127.0.0.1:1002"
T1, T2 = "1" * 64, "2" * 64
PIECE = 1 << 20


def host(host_id: str, down: int = 0, up: int = 0, **kw: object) -> InspectHost:
    values: dict[str, object] = {"hostname": host_id, "ip": "10.0.0.1", "port": 1, "type": "normal", **kw}
    return InspectHost(host_id=host_id, bytes_downloaded=down, bytes_uploaded=up, **values)  # type: ignore[arg-type]


def task(task_id: str, got: int = 0, **kw: object) -> InspectTask:
    values: dict[str, object] = {"url": f"http://o/{task_id[:4]}", "state": "running", "piece_count": 10, **kw}
    return InspectTask(task_id=task_id, bytes_from_peers=got, **values)  # type: ignore[arg-type]


def peer(peer_id: str, parents: list[str], finished: int = 0, depth: int = 0, state: str = "running") -> InspectPeer:
    return InspectPeer(
        peer_id=peer_id,
        host_id=f"h-{peer_id}",
        hostname=f"host-{peer_id}",
        state=state,  # type: ignore[arg-type]
        finished_pieces=finished,
        parents=parents,
        depth=depth,
    )


def snap(clock_ms: int, hosts: list[InspectHost], tasks: list[InspectTask], **kw: object) -> SchedSnapshot:
    return SchedSnapshot(scheduler="s", clock_ms=clock_ms, hosts=hosts, tasks=tasks, hosts_total=len(hosts), **kw)  # type: ignore[arg-type]


def test_rates_are_counter_differences_over_the_schedulers_clock_and_a_reset_gives_none() -> None:
    view = TopView([A])
    view.update(A, snap(10_000, [host("h1", down=0, up=0)], [task(T1, got=0)]), now=1.0)
    assert view.hosts()[0].download_rate == 0  # one snapshot: no rate yet
    # Two seconds later on the scheduler's clock (the poll took longer here: that does not matter).
    view.update(A, snap(12_000, [host("h1", down=4_000_000, up=1_000_000)], [task(T1, got=6_000_000)]), now=9.0)
    row = view.hosts()[0]
    assert (row.download_rate, row.upload_rate) == (2_000_000, 500_000)
    assert view.tasks()[0][0].rate == 3_000_000
    # The host was announced again: its counters restarted; no rate this round rather than a negative one.
    view.update(A, snap(13_000, [host("h1", down=10, up=10)], [task(T1, got=7_000_000)]), now=10.0)
    assert view.hosts()[0].download_rate == 0 and view.tasks()[0][0].rate == 1_000_000
    # The same clock again (a repeated answer): rates are not computed over zero seconds.
    view.update(A, snap(13_000, [host("h1", down=50, up=10)], []), now=10.5)
    assert view.hosts()[0].download_rate == 0


def test_hosts_of_several_schedulers_are_merged_and_sorted_by_the_chosen_key() -> None:
    view = TopView([A, B])
    a_first = "a-first"
    for endpoint in (A, B):
        view.update(endpoint, snap(0, [host("h1"), host("h2"), host("h3", hostname=a_first)], []), now=0)
    hosts_a = [host("h1", down=100), host("h2", down=300, uploads=2), host("h3", up=50, hostname=a_first)]
    view.update(A, snap(1000, hosts_a, []), now=1)
    view.update(
        B,
        snap(
            1000,
            [host("h1", down=400, upload_rate=7), host("h2", uploads=1), host("h3", upload_rate=900, hostname=a_first)],
            [],
        ),
        now=1,
    )
    rows = view.hosts()
    assert [r.host_id for r in rows] == ["h1", "h2", "h3"]  # down: 500, 300, 0
    assert (rows[0].download_rate, rows[0].measured_upload_rate, rows[1].uploads) == (500, 7, 3)
    assert view.hosts_count() == 3
    assert view.cycle_sort() == "up" and [r.host_id for r in view.hosts()] == ["h3", "h1", "h2"]
    assert view.cycle_sort() == "slots" and view.hosts(1)[0].host_id == "h2"
    view.cycle_sort()
    assert view.cycle_sort() == "name" and [r.hostname for r in view.hosts()] == ["a-first", "h1", "h2"]
    assert view.cycle_sort() == "down" and view.hosts(limit=2) == rows[:2] and view.hosts(limit=0) == []


def test_the_swarm_is_a_tree_under_the_first_parent_listed_before_each_peer() -> None:
    t = task(T1, piece_count=10, peers=5)
    peers = [
        peer("seed", [], 10, 0, "back_to_source"),
        peer("a", ["seed"], 4, 1),
        peer("b", ["seed", "a"], 2, 1),
        peer("c", ["a", "b"], 1, 2),
        peer("d", ["gone"], 0, 0),  # its parent was cut off the page: drawn as a root
    ]
    roots = build_tree(peers, t)
    assert [r.peer_id for r in roots] == ["seed", "d"]
    seed = roots[0]
    assert [c.peer_id for c in seed.children] == ["a", "b"]
    assert [c.peer_id for c in seed.children[0].children] == ["c"] and seed.children[0].children[0].other_parents == 1
    assert seed.children[1].other_parents == 1 and seed.children[1].progress == 0.2
    assert roots[1].other_parents == 1 and seed.progress == 1.0

    view = TopView([A])
    view.update(A, snap(0, [], [t], task=t, peers=peers), now=0)
    view.update(A, snap(500, [], [t], task=t, peers=[*peers[:3], peer("c", ["a", "b"], 3, 2), peers[4]]), now=1)
    swarm = view.swarm()
    assert swarm.shown == 5 and swarm.total == 5 and swarm.task is not None
    c = swarm.roots[0].children[0].children[0]
    assert c.peer_id == "c" and c.rate == 0  # 2 pieces, but no piece length known: no byte rate
    t_len = task(T1, piece_count=10, peers=5, piece_length=PIECE)
    view.update(A, snap(1500, [], [t_len], task=t_len, peers=[peer("seed", [], 10), peer("c", ["seed"], 7, 1)]), now=2)
    assert view.swarm().roots[0].children[0].rate == 4 * PIECE  # 4 pieces in one second
    limited = view.swarm(limit=1)
    assert limited.shown == 1 and limited.roots[0].children == []


def test_selection_moves_within_the_tasks_and_follows_a_task_that_stays() -> None:
    view = TopView([A, B])
    view.update(A, snap(0, [], [task(T1, running=3, peers=3)]), now=0)
    view.update(B, snap(0, [], [task(T2, running=1, peers=9)]), now=0)
    rows, selected = view.tasks()
    assert [r.task_id for r in rows] == [T1, T2] and selected == 0  # the most active first, selected
    assert (rows[0].scheduler, rows[1].scheduler) == (A, B)
    assert view.wanted_task(A) == T1 and view.wanted_task(B) is None  # only its scheduler is asked for its swarm
    assert view.move(1) == T2 and view.move(5) == T2 and view.move(-9) == T1
    view.move(1)
    view.update(A, snap(1000, [], [task(T1, running=0, peers=3)]), now=1)  # T2 is now first; still selected
    rows, selected = view.tasks()
    assert rows[selected].task_id == T2 and selected == 0
    window, selected = view.tasks(limit=1)
    assert [r.task_id for r in window] == [T2] and selected == 0
    view.update(B, snap(1000, [], []), now=1)  # T2 is gone: the first task is selected
    assert view.selected == T1


def test_failures_reach_the_errors_once_and_the_scheduler_comes_back() -> None:
    view = TopView([A])
    view.failed(A, "no answer (timeout)", now=1)
    view.failed(A, "no answer (timeout)", now=2)
    assert [e[2] for e in view.errors] == ["no answer (timeout)"] and not view.health[A].ok
    view.update(A, snap(0, [], []), now=3)
    assert view.health[A].ok and view.errors[-1][2] == "answers again"
    for k in range(80):
        view.note(k, "x", str(k))
    assert len(view.errors) == 50 and view.errors[-1][2] == "79"


def test_a_frame_shows_only_the_rows_the_terminal_has() -> None:
    view = TopView([A])
    hosts = [host(f"h{k:04d}", down=k) for k in range(1000)]
    view.update(A, snap(0, [host(h.host_id) for h in hosts], [task(T1)]), now=0)
    view.update(A, snap(1000, hosts, [task(T1, got=5_000_000)]), now=1)
    out = io.StringIO()
    print_once(view, out=out, width=160, height=48)
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 48 and max(len(line) for line in lines) <= 160
    assert "h0999" in text and "h0000" not in text  # the busiest on top; the rest are not drawn
    assert "hosts (" in text and "of 1000, by down" in text and "5.0 MB/s" in text
    assert human_rate(0.5) == "0" and human_rate(1500) == "1.5 kB/s" and human_rate(999) == "999 B/s"


def test_keys_from_the_terminal() -> None:
    assert parse_keys(b"jk\x1b[A\x1b[B\x1bOAsq") == ["j", "k", "up", "down", "up", "s", "q"]
    assert parse_keys(b"\x1b") == ["escape"] and parse_keys(b"\x1b[5~x\x1b[1;5A") == ["x"]
    view = TopView([A])
    view.update(A, snap(0, [], [task(T1, running=2), task(T2, running=1)]), now=0)
    assert apply_key(view, "down") and view.selected == T2
    assert apply_key(view, "k") and view.selected == T1
    assert apply_key(view, "s") and view.host_sort == "up"
    assert not apply_key(view, "q")


def test_sources_are_checked(tmp_path: Path) -> None:
    good = {"schedulers": ["tcp://127.0.0.1:8002", "ipc:///run/s"], "manager": {"url": "http://127.0.0.1:8080/"}}
    (tmp_path / "cluster.json").write_text(json.dumps(good))
    assert read_cluster_json(tmp_path) == (("tcp://127.0.0.1:8002", "ipc:///run/s"), "http://127.0.0.1:8080")
    sources = resolve_sources(cluster=None, manager=None, schedulers=(), token=None, default_dir=tmp_path)
    assert sources.schedulers == ("tcp://127.0.0.1:8002", "ipc:///run/s") and sources.manager == "http://127.0.0.1:8080"
    explicit = resolve_sources(
        cluster=None, manager=None, schedulers=("tcp://h:1", "tcp://h:1"), token=None, default_dir=tmp_path
    )
    assert explicit.schedulers == ("tcp://h:1",) and explicit.manager is None

    bad = {
        "not json": "{",
        "a list": "[]",
        "no schedulers": "{}",
        "schedulers not strings": '{"schedulers": [1]}',
        "a bad endpoint": '{"schedulers": ["udp://x:1"]}',
        "a port out of range": '{"schedulers": ["tcp://x:70000"]}',
        "a bad manager": '{"schedulers": ["tcp://x:1"], "manager": {"url": "ftp://x"}}',
        "a manager not an object": '{"schedulers": ["tcp://x:1"], "manager": "http://x"}',
    }
    for why, text in bad.items():
        (tmp_path / "cluster.json").write_text(text)
        with pytest.raises(TopError):
            read_cluster_json(tmp_path / "cluster.json")
            pytest.fail(why)
    with pytest.raises(TopError, match="is `dfz up` running there"):
        read_cluster_json(tmp_path / "nowhere")
    with pytest.raises(TopError, match="needs --token"):
        resolve_sources(cluster=None, manager="http://127.0.0.1:9", schedulers=(), token=None, default_dir=tmp_path)
    with pytest.raises(TopError, match="cannot reach the manager"):
        resolve_sources(cluster=None, manager="http://127.0.0.1:9", schedulers=(), token="t", default_dir=tmp_path)
    for endpoint in ("tcp://h", "tcp://:1", "x", "tcp://h:1 2", "inproc://"):
        with pytest.raises(TopError):
            check_endpoint(endpoint)

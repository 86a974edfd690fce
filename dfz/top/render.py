"""One frame of ``dfz top``: rich renderables from a :class:`~dfz.top.view.TopView`, sized to the terminal.

Only the rows that fit are built (the view cuts its lists to the heights computed here), so a frame costs
the same with 10 hosts or 1,000. No I/O: :mod:`dfz.top.app` prints what this returns.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .view import SwarmNode, TopView, human_bytes, human_rate

KEYS_HELP = "q quit · ↑/↓ or j/k select a task · s sort hosts"

_STATE_STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "back_to_source": "yellow",
    "pending": "dim",
    "failed": "red",
    "left": "dim",
}


@dataclass(frozen=True)
class Frame:
    """Rows each part of a frame has, from the terminal's size."""

    header: int
    hosts: int
    tasks: int
    tree: int
    footer: int

    @classmethod
    def of(cls, height: int, schedulers: int, manager: bool = False) -> Frame:
        header = 2 + min(schedulers, 4) + manager
        footer = 8 if height >= 30 else 5
        main = max(6, height - header - footer)
        hosts_panel = main // 2
        return cls(
            header=header,
            hosts=max(1, hosts_panel - 3),  # border above and below, and the table's header line
            tasks=max(1, main - hosts_panel - 3),
            tree=max(1, main - 3),  # borders and the task's line at the root
            footer=footer,
        )


def render(view: TopView, *, height: int, now: float) -> RenderableType:
    """The whole frame for a terminal ``height`` lines high (the width is the console's); ``now`` is the Unix
    time (the clock the view's updates and errors are stamped with)."""
    frame = Frame.of(height, len(view.health), view.manager is not None)
    layout = Layout()
    layout.split_column(
        Layout(_header(view, now), name="header", size=frame.header),
        Layout(name="main"),
        Layout(name="footer", size=frame.footer),
    )
    layout["main"].split_row(Layout(name="left", ratio=3), Layout(_swarm(view, frame.tree), name="swarm", ratio=2))
    layout["left"].split_column(Layout(_hosts(view, frame.hosts), name="hosts"), Layout(_tasks(view, frame.tasks), name="tasks"))
    if view.manager is not None:
        layout["footer"].split_row(
            Layout(_jobs(view, frame.footer - 3), name="jobs"), Layout(_errors(view, frame.footer - 2), name="errors")
        )
    else:
        layout["footer"].update(_errors(view, frame.footer - 2))
    return layout


def _header(view: TopView, now: float) -> RenderableType:
    clock = dt.datetime.fromtimestamp(now).strftime("%H:%M:%S")
    title = Text.assemble(("dfz top", "bold"), f"  {clock}  ", ("sort hosts: ", "dim"), (view.host_sort, "bold"), "  ")
    title.append(KEYS_HELP, style="dim")
    lines: list[RenderableType] = [title]
    shown = list(view.health.values())[:4]
    for h in shown:
        line = Text()
        if h.ok:
            line.append("● ", style="green")
            line.append(f"{h.name or 'scheduler'} ", style="bold")
            line.append(f"{h.endpoint}  {h.latency_ms:.0f} ms  ", style="dim")
            line.append(
                f"hosts {h.hosts} (seeds {h.seed_hosts})  tasks {h.tasks}  peers {h.peers}  downloading {h.downloading}  "
            )
            line.append(f"upload {human_rate(h.upload_rate)}  origin {human_bytes(h.bytes_from_origin)}  ")
            line.append(f"from peers {human_bytes(h.bytes_from_peers)}")
            if h.tenant:
                line.append(f"  tenant {h.tenant}", style="magenta")
            if h.hosts_seen < h.hosts:
                line.append(f"  (first {h.hosts_seen} hosts)", style="yellow")
        else:
            line.append("● ", style="red")
            line.append(f"{h.name or 'scheduler'} {h.endpoint}  ", style="bold")
            line.append(h.error or "waiting for the first answer", style="red" if h.error else "dim")
        lines.append(line)
    if len(view.health) > len(shown):
        lines[-1].append(f"  (+{len(view.health) - len(shown)} schedulers)", style="dim")  # type: ignore[union-attr]
    if view.manager is not None:
        lines.append(_manager(view, now))
    lines.append(_seeds(view))
    return Group(*lines)


def _manager(view: TopView, now: float) -> Text:
    manager = view.manager
    assert manager is not None
    line = Text(f"manager {manager.url}  ", style="dim")
    if manager.error:
        return line.append(manager.error, style="red")
    if manager.notice:
        return line.append(manager.notice, style="dim")
    for what, rows in (("schedulers", manager.schedulers), ("seed peers", manager.seed_peers)):
        active = sum(1 for r in rows if r.get("state") == "active")
        line.append(f"{what} {active}/{len(rows)} active  ", style="green" if active == len(rows) else "yellow")
    if manager.updated is not None:
        line.append(f"(asked {max(0.0, now - manager.updated):.0f} s ago)", style="dim")
    return line


def _seeds(view: TopView) -> Text:
    line = Text("seeds: ", style="dim")
    manager = view.manager
    if manager is not None and manager.seed_peers:
        for seed in manager.seed_peers[:8]:
            active = seed.get("state") == "active"
            line.append("● ", style="green" if active else "red")
            line.append(f"{seed.get('hostname', '?')} {seed.get('ip', '')}:{seed.get('port', '')} {seed.get('state', '?')}  ")
        return line
    seeds = [h for h in view.hosts() if h.type == "seed"]
    if not seeds:
        line.append("none announced to the schedulers", style="yellow")
    for h in seeds[:8]:
        line.append("● ", style="green")
        line.append(f"{h.hostname} ({h.ip})  up {human_rate(max(h.upload_rate, h.measured_upload_rate))}  ")
        line.append(f"slots {h.uploads}/{h.upload_slots}  ")
    return line


def _hosts(view: TopView, rows: int) -> RenderableType:
    table = Table(expand=True, box=None, pad_edge=False, show_edge=False)
    heads = (
        ("HOST", "name"),
        ("ID", ""),
        ("TYPE", ""),
        ("DOWN", "down"),
        ("UP", "up"),
        ("UP (own)", ""),
        ("SLOTS", "slots"),
        ("PEERS", "peers"),
    )
    for head, key in heads:
        style = "bold reverse" if key == view.host_sort else "bold"
        justify = "left" if head in ("HOST", "ID", "TYPE") else "right"
        table.add_column(head, header_style=style, justify=justify, no_wrap=True, overflow="ellipsis")  # type: ignore[arg-type]
    hosts = view.hosts(rows)
    for h in hosts:
        table.add_row(
            h.hostname,
            h.host_id[:16],
            h.type,
            human_rate(h.download_rate),
            human_rate(h.upload_rate),
            human_rate(h.measured_upload_rate),
            f"{h.uploads}/{h.upload_slots}",
            str(h.peers),
        )
    total = view.hosts_count()
    return Panel(table, title=f"hosts ({len(hosts)} of {total}, by {view.host_sort})", title_align="left")


def _tasks(view: TopView, rows: int) -> RenderableType:
    table = Table(expand=True, box=None, pad_edge=False, show_edge=False)
    table.add_column("TASK", no_wrap=True, width=9)
    table.add_column("URL", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("STATE", no_wrap=True)
    table.add_column("PROGRESS", no_wrap=True, width=18)
    table.add_column("PEERS", justify="right", no_wrap=True)
    table.add_column("RATE", justify="right", no_wrap=True)
    table.add_column("FROM PEERS/ORIGIN", justify="right", no_wrap=True)
    tasks, selected = view.tasks(rows)
    for i, t in enumerate(tasks):
        bar = Text("?", style="dim") if t.progress is None else _bar(t.progress, 12)
        table.add_row(
            ("▶ " if i == selected else "  ") + t.task_id[:7],
            t.url,
            Text(t.state, style=_STATE_STYLE.get(t.state, "")),
            bar,
            f"{t.downloading}/{t.peers}" + (f" ✗{t.failed}" if t.failed else ""),
            human_rate(t.rate),
            f"{human_bytes(t.bytes_from_peers)} / {human_bytes(t.bytes_from_origin)}",
            style="reverse" if i == selected else "",
        )
    total = len(view.tasks()[0])
    return Panel(table, title=f"tasks ({total})", title_align="left")


def _bar(fraction: float, width: int) -> Text:
    """A progress bar and its percentage as one Text: a nested table per row would cost more than the rest
    of the frame."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    bar = Text("━" * filled, style="green" if filled == width else "magenta")
    bar.append("━" * (width - filled), style="grey23")
    bar.append(f" {fraction:4.0%}")
    return bar


def _swarm(view: TopView, rows: int) -> RenderableType:
    swarm = view.swarm(rows)
    if swarm.task is None:
        return Panel(Text("no task", style="dim"), title="swarm", title_align="left")
    t = swarm.task
    root = Tree(Text.assemble((t.task_id[:12], "bold"), " ", (t.url, "dim")), guide_style="dim")
    if not swarm.roots:
        root.add(Text("no peers shown yet", style="dim"))
    for node in swarm.roots:
        _branch(root, node)
    if swarm.shown < swarm.total:
        root.add(Text(f"… {swarm.total - swarm.shown} more peers", style="dim"))
    return Panel(root, title=f"swarm of {t.task_id[:12]} ({swarm.total} peers)", title_align="left")


def _branch(parent: Tree, node: SwarmNode) -> None:
    label = Text(no_wrap=True, overflow="ellipsis")  # one line per peer: the tree's height is the rows it has
    label.append(node.hostname, style="bold")
    label.append(f" {node.peer_id[:20]} ", style="dim")
    label.append(node.state, style=_STATE_STYLE.get(node.state, ""))
    if node.progress is not None:
        label.append(f" {node.progress:.0%}")
    if node.rate >= 1:
        label.append(f" ↓{human_rate(node.rate)}", style="cyan")
    if node.other_parents:
        label.append(f" (+{node.other_parents} parents)", style="dim")
    branch = parent.add(label)
    for child in node.children:
        _branch(branch, child)


def _jobs(view: TopView, rows: int) -> RenderableType:
    manager = view.manager
    assert manager is not None
    table = Table(expand=True, box=None, pad_edge=False, show_edge=False)
    for head in ("JOB", "TYPE", "STATE", "CREATED", "ERROR"):
        table.add_column(head, no_wrap=True, overflow="ellipsis", ratio=2 if head == "ERROR" else None)
    for job in manager.jobs[: max(0, rows)]:
        state = str(job.get("state", ""))
        style = {"SUCCESS": "green", "FAILURE": "red", "PENDING": "cyan"}.get(state, "")
        table.add_row(
            str(job.get("id", "")),
            str(job.get("type", "")),
            Text(state, style=style),
            str(job.get("created_at", ""))[:19].replace("T", " "),
            str(job.get("error", "")),
        )
    title = f"recent jobs ({manager.url})"
    if manager.error or manager.notice:
        text = Text(manager.error, style="red") if manager.error else Text(manager.notice, style="dim")
        return Panel(text, title=title, title_align="left")
    return Panel(table, title=title, title_align="left")


def _errors(view: TopView, rows: int) -> RenderableType:
    lines = Text()
    shown = view.errors[-max(1, rows) :]
    for i, (at, source, message) in enumerate(shown):
        if i:
            lines.append("\n")
        lines.append(f"{dt.datetime.fromtimestamp(at).strftime('%H:%M:%S')} ", style="dim")
        lines.append(f"{source}: ", style="bold")
        lines.append(message, style="red")
    if not shown:
        lines.append("none", style="dim")
    return Panel(lines, title=f"errors ({len(view.errors)})", title_align="left")

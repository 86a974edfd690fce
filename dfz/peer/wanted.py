"""The pieces a download's callers need first: the union of the byte ranges they asked for.

A caller of :meth:`Daemon.download <dfz.peer.daemon.Daemon.download>` may name a byte range it needs
before the rest (:attr:`dfz.peer.local.DownloadRequest.priority_range`: a ``Range`` request on the proxy
port, a lazy image pull, a model loader reading one tensor). Every caller of one task adds its range to the
task's :class:`WantedPieces` while it follows the download, and takes it out when it leaves; once the
layout (piece length, content length) is known, the ranges become piece indices, and whoever fetches the
pieces (the swarm's :class:`~dfz.peer.download.PiecePicker`, the back-to-source
:class:`~dfz.peer.origin.OriginOrder`) watches the set and takes those pieces first. The ranges also travel
with the daemon's registration (``sched.register_peer`` ``wanted``) to the seed that fetches the task from
the origin (``sched.seed`` ``wanted``), which adds them to its own download. Sans-I/O: no trio, no clock.
"""

from __future__ import annotations

from collections.abc import Callable

from ..tasks import PieceLayout

__all__ = ["ByteRange", "WantedPieces", "check_byte_range", "pieces_of", "resolve_byte_range"]

ByteRange = tuple[int, int | None]
"""``(start, end)``: bytes ``[start, end)``, ``end`` None for "to the end" (an ``end`` past the content is
cut to it); a negative ``start`` (with ``end`` None) is the last ``-start`` bytes, as ``bytes=-N``."""


def check_byte_range(byte_range: ByteRange) -> None:
    """``ValueError`` unless ``byte_range`` is one of the forms of :data:`ByteRange`."""
    start, end = byte_range
    if start < 0:
        if end is not None:
            raise ValueError(f"a range of the last {-start} bytes has no end, not {end}")
    elif end is not None and end <= start:
        raise ValueError(f"the byte range [{start}, {end}) is empty")


def resolve_byte_range(byte_range: ByteRange, content_length: int) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` that ``byte_range`` covers of ``content_length`` bytes; None when it
    covers none (it starts at or after the end)."""
    start, end = byte_range
    if start < 0:
        start, end = max(0, content_length + start), content_length
    end = content_length if end is None else min(end, content_length)
    if start >= end:
        return None
    return start, end


def pieces_of(byte_range: ByteRange, layout: PieceLayout) -> range:
    """The indices of the pieces that hold the bytes of ``byte_range`` (empty when it covers none)."""
    span = resolve_byte_range(byte_range, layout.content_length)
    if span is None:
        return range(0)
    start, end = span
    return range(start // layout.piece_length, (end - 1) // layout.piece_length + 1)


class WantedPieces:
    """The union of the wanted byte ranges of a task's callers, as piece indices once the layout is known.

    :meth:`add` a range (a token comes back), :meth:`remove` it by its token; :meth:`set_layout` when the
    task's layout is known. :meth:`watch` calls its function with the wanted pieces at once and after
    every change (synchronously)."""

    def __init__(self) -> None:
        self._ranges: dict[int, ByteRange] = {}
        self._tokens = 0
        self._layout: PieceLayout | None = None
        self._watchers: list[Callable[[frozenset[int]], None]] = []
        self.pieces: frozenset[int] = frozenset()
        """The wanted pieces now (empty until the layout is known)."""

    @property
    def ranges(self) -> list[ByteRange]:
        return list(self._ranges.values())

    def add(self, byte_range: ByteRange) -> int:
        check_byte_range(byte_range)
        self._tokens += 1
        self._ranges[self._tokens] = byte_range
        self._recompute()
        return self._tokens

    def remove(self, token: int) -> None:
        if self._ranges.pop(token, None) is not None:
            self._recompute()

    def set_layout(self, layout: PieceLayout) -> None:
        if layout != self._layout:
            self._layout = layout
            self._recompute()

    def watch(self, on_change: Callable[[frozenset[int]], None]) -> Callable[[], None]:
        """Call ``on_change(pieces)`` now and after each change; returns the function that stops it."""
        self._watchers.append(on_change)
        on_change(self.pieces)

        def unwatch() -> None:
            if on_change in self._watchers:
                self._watchers.remove(on_change)

        return unwatch

    def _recompute(self) -> None:
        layout = self._layout
        pieces: set[int] = set()
        if layout is not None:
            for byte_range in self._ranges.values():
                pieces.update(pieces_of(byte_range, layout))
        fresh = frozenset(pieces)
        if fresh != self.pieces:
            self.pieces = fresh
            for on_change in list(self._watchers):
                on_change(fresh)

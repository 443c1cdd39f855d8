"""The fast path's big commands, packed with numpy into one reused buffer.

Writing a batch's records is one HSET of ~2,000 arguments (~290 kB) plus a ZADD of ~2,000; packed
argument by argument (hiredis) that costs more than computing the records, and a fresh buffer
of that size per batch is ~70 page faults. Here every argument has the shape
``$<len>\\r\\n<bytes>\\r\\n``: agent names are the same from batch to batch (their encoding is
cached), records all have record.SIZE bytes and fleet-index scores are 13-digit integers (Redis
ms until 2286). So the agents are grouped by the length of their name and each group is laid out
as a matrix, one row per agent (name, value or value, name): a few array copies per group,
whatever the batch size. Anything else (another score length, a fractional score) goes to
hiredis.
"""

from __future__ import annotations

from typing import Any, Final

import hiredis
import numpy as np

_DIGITS: Final = 10 ** np.arange(12, -1, -1, dtype=np.int64)


class Packer:
    """Packs the commands of one exchange into a buffer reused by the next (:meth:`begin`)."""

    def __init__(self) -> None:
        self._bulks: dict[str, bytes] = {}
        self._buffer = np.empty(1 << 16, dtype=np.uint8)
        self._used = 0
        self._last: tuple[Any, list[bytes]] = (None, [])

    def begin(self) -> None:
        """Start packing the next exchange (what was packed before must have been sent)."""
        self._used, self._last = 0, (None, [])

    def bulks(self, names: list[str]) -> list[bytes]:
        """``$<len>\\r\\n<name>\\r\\n`` of each name (the same list again: the same answer)."""
        if names is self._last[0]:
            return self._last[1]
        cache = self._bulks
        out = list(map(cache.get, names))
        if None in out:
            if len(cache) > 200_000:  # agent names churn: keep the cache bounded
                cache.clear()
            for k, name in enumerate(names):
                if out[k] is None:
                    raw = name.encode()
                    out[k] = cache[name] = b"$%d\r\n%s\r\n" % (len(raw), raw)
        done: list[bytes] = out  # type: ignore[assignment]
        self._last = (names, done)
        return done

    def names(self, head: tuple[str, ...], names: list[str]) -> list[Any]:
        """``*head, *names`` (HMGET, ZREM) as pieces to send."""
        return [_header(head, len(names)), b"".join(self.bulks(names))]

    def pairs(
        self, head: tuple[str, ...], names: list[str], values: np.ndarray, *, name_first: bool
    ) -> list[Any]:
        """``*head`` then per agent its name and its value (``name_first``) or the other way
        round; ``values``: one row of bytes per agent, all the same size (uint8 matrix)."""
        bulks = self.bulks(names)
        count, width = values.shape
        prefix = np.frombuffer(b"$%d\r\n" % width, dtype=np.uint8)
        value_size = len(prefix) + width + 2
        lengths = np.fromiter(map(len, bulks), dtype=np.int64, count=len(bulks))
        total = int(lengths.sum()) + value_size * count
        start = self._reserve(total)
        offset = start
        sizes = np.unique(lengths).tolist()
        for size in sizes:
            group: Any = slice(None)  # one size (the usual case): no gathering
            named_bulks = bulks
            if len(sizes) > 1:
                group = np.flatnonzero(lengths == size)
                named_bulks = [bulks[k] for k in group.tolist()]
            rows = self._buffer[offset : offset + len(named_bulks) * (size + value_size)].reshape(
                len(named_bulks), -1
            )
            named = np.frombuffer(b"".join(named_bulks), dtype=np.uint8)
            name_at, value_at = (0, size) if name_first else (value_size, 0)
            rows[:, name_at : name_at + size] = named.reshape(-1, size)
            rows[:, value_at : value_at + len(prefix)] = prefix
            rows[:, value_at + len(prefix) : value_at + value_size - 2] = values[group]
            rows[:, value_at + value_size - 2 : value_at + value_size] = (13, 10)  # CRLF
            offset += rows.size
        return [_header(head, 2 * count), self._buffer[start : start + total].data]

    def _reserve(self, size: int) -> int:
        start = self._used
        if start + size > len(self._buffer):  # packed views keep the old buffer alive until sent
            self._buffer = np.empty(max(2 * len(self._buffer), 2 * size), dtype=np.uint8)
            start = 0
        self._used = start + size
        return start


def _header(head: tuple[str, ...], more: int) -> bytes:
    parts = [part.encode() for part in head]
    return b"*%d\r\n" % (len(parts) + more) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def score_digits(scores: np.ndarray) -> np.ndarray | None:
    """13-digit integral scores as their digits (uint8 matrix, one row each), or None if any
    score is another kind of number (then pack the command with :func:`pack`)."""
    whole = scores.astype(np.int64)
    if not ((whole == scores) & (whole >= 10**12) & (whole < 10**13)).all():
        return None
    digits: np.ndarray = ((whole[:, None] // _DIGITS) % 10 + ord("0")).astype(np.uint8)
    return digits


def pack(command: tuple[Any, ...]) -> bytes:
    """Any other command, argument by argument."""
    packed: bytes = hiredis.pack_command(command)
    return packed

"""One agent's detector state as a fixed-layout binary record, readable from Python and Lua.

Every built-in detector keeps its per-agent state in one record, a field of the shard's
``states`` hash (see :meth:`agentwatch.keys.Keys.states`). A record is ~290 bytes: a hash of
records costs less than half the memory of one Redis hash per agent, and the batch update reads
and writes a whole batch of agents with one HMGET and one HSET.

The layout is declared once, here (:data:`FIELDS`). The Lua that unpacks and packs records is
generated from the same list, so Python and Lua cannot disagree about where a field lives.
A record written by another layout version (or damaged, or lost with a Redis that restarted
without persistence) is treated as absent: the agent starts afresh. That costs a warm-up of the
token baselines, and the declared interval until the agent's next pulse (pulses repeat it):
until then silence and stall allow ``after`` alone.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Final

VERSION: Final = 3

# (name, struct code, meaning). Codes: d = float64, f = float32, I = uint32, H = uint16,
# B = uint8. Times are Redis server milliseconds; sizes are KiB.
FIELDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("ver", "B", "layout version"),
    ("flags", "I", "FLAG_* bits below"),
    ("run", "d", "hash of the current run id (48 bits)"),
    ("prun", "d", "hash of the previous run id"),
    ("hw", "d", "highest seq applied in the current run (-1: none yet)"),
    ("g1a", "d", "first gap below hw: seqs g1a..g1b not yet seen (0, 0: none)"),
    ("g1b", "d", ""),
    ("g2a", "d", "second gap"),
    ("g2b", "d", ""),
    ("start", "d", "when the current run started"),
    ("seen", "d", "last event of any kind, any run"),
    ("beat", "d", "last beat"),
    ("pulse", "d", "last pulse"),
    ("pg", "f", "time between the last two pulses, ms: how fresh a pulse must be to prove life"),
    ("xu", "d", "clocks start no earlier: an extend(), or a return after a gap that proved no life"),
    ("iv", "f", "declared interval, seconds (0: none)"),
    ("sa", "d", "silence allowance, ms: max(after, 3 x interval)"),
    ("ta", "d", "stall allowance, ms"),
    ("armed", "d", "score of this agent in the timers set (0: not armed)"),
    ("idx", "d", "score last written to the fleet index"),
    ("tb", "f", "tokens per beat: EWMA numerator"),
    ("tw", "f", "tokens per beat: EWMA weight (bias correction)"),
    ("cb", "f", "cost per beat: EWMA numerator"),
    ("cw", "f", "cost per beat: EWMA weight"),
    ("tn", "I", "beats with usage seen (warm-up)"),
    ("hot", "H", "consecutive anomalous observations"),
    ("calm", "H", "consecutive normal beats while firing"),
    ("tx", "d", "when the last tokens incident ended (late beats before it are told of already)"),
    ("bt", "d", "beats, total (all runs; reports take differences of totals)"),
    ("tt", "d", "tokens, total"),
    ("ct", "d", "cost, total (USD)"),
    ("ws", "d", "start of the current rate window"),
    ("wt", "d", "tokens in the current rate window"),
    ("rb", "f", "tokens per second per window: EWMA numerator"),
    ("rw", "f", "tokens per second per window: EWMA weight"),
    ("rn", "H", "rate windows closed"),
    ("pws", "d", "start of the window closed last (negative: not folded into the rate; 0: none)"),
    ("pwt", "f", "tokens in the window closed last"),
    ("fp", "I", "fingerprint (crc32) of the last beat"),
    ("fc", "I", "how many beats in a row carried it"),
    ("lf", "I", "the fingerprint that is looping (loop incident open)"),
    ("lq", "H", "beats without the looping fingerprint, while open"),
    ("r0", "I", "first RSS of the run, KiB"),
    ("t0", "d", "when it was taken"),
    ("rl", "I", "last RSS, KiB"),
    ("rpk", "I", "highest RSS of the run, KiB"),
    ("bk", "d", "current RSS bucket (time // bucket)"),
    ("bm", "I", "lowest RSS in the current bucket, KiB"),
    ("mh", "B", "memory evaluations in a row that project the limit"),
    ("mc", "B", "memory evaluations in a row that do not"),
    ("sr", "H", "events on time in a row since a silence ended (while its incident is open)"),
    ("sw", "f", "how long that silence lasted, ms"),
    ("kr", "H", "beats on time in a row since a stall ended (while its incident is open)"),
    ("kw", "f", "how long that stall lasted, ms"),
)

NAMES: Final = tuple(name for name, _, _ in FIELDS)
FORMAT: Final = "<" + "".join(code for _, code, _ in FIELDS)
SIZE: Final = struct.calcsize(FORMAT)
_STRUCT: Final = struct.Struct(FORMAT)

# Flag bits. "Open" bits mirror incidents the detectors decided; alerts.Incidents holds the
# published truth, detectors/intents.py keeps the two in step.
RETIRED: Final = 1 << 0  # deliberate shutdown: no silence expected
EXITED: Final = 1 << 1  # the current run exited without shutdown and the exit alert covers it
SILENCE: Final = 1 << 2
STALL: Final = 1 << 3
EXIT: Final = 1 << 4
TOKENS: Final = 1 << 5
LOOP: Final = 1 << 6
MEMORY: Final = 1 << 7
HAS_STACK: Final = 1 << 8  # the stacks hash holds this agent's newest stack
HAS_RSS: Final = 1 << 9  # the rss hash holds a window for this agent
TOKENS_COST: Final = 1 << 10  # the open tokens incident is about cost per beat
NO_SILENCE: Final = 1 << 11  # silence is off for this agent: a schedule judges it (detectors/schedule.py)

OPEN_BITS: Final = {
    "silence": SILENCE,
    "stall": STALL,
    "exit": EXIT,
    "tokens": TOKENS,
    "loop": LOOP,
    "memory": MEMORY,
}


def decode(raw: bytes | None) -> dict[str, Any] | None:
    """A record as a dict of :data:`NAMES`, or None if absent or of another layout."""
    if raw is None or len(raw) != SIZE:
        return None
    values = _STRUCT.unpack(raw)
    if values[0] != VERSION:
        return None
    return dict(zip(NAMES, values, strict=True))


def encode(fields: dict[str, Any]) -> bytes:
    """The inverse of :func:`decode` (tests and tools; workers write records from Lua)."""
    values = [fields.get(name, 0) for name in NAMES]
    values[0] = VERSION
    return _STRUCT.pack(*values)


def lua() -> str:
    """Lua helpers ``rec_new()``, ``rec_load(raw)`` and ``rec_dump(r)`` for this layout.

    In Lua a record is an *array* (``r[11]``), not a table of named fields: unpacking ~50 fields
    into a fresh hash table costs several times more, and that cost is paid for every agent of
    every batch. Scripts are still written with names (``r.seen``); :func:`compile` rewrites
    them to indexes.
    """
    lua_format = "<" + "".join("I4" if code == "I" else code for _, code, _ in FIELDS)
    fresh = ", ".join("-1" if name == "hw" else str(VERSION) if name == "ver" else "0" for name in NAMES)
    return f"""
local REC_FORMAT = '{lua_format}'
local REC_SIZE, REC_FIELDS = {SIZE}, {len(NAMES)}
local function rec_new()
  return {{{fresh}}}
end
local function rec_load(raw)
  if not raw or #raw ~= REC_SIZE then return rec_new() end
  local r = {{struct.unpack(REC_FORMAT, raw)}}
  if r[1] ~= {VERSION} then return rec_new() end
  return r
end
local function rec_dump(r)
  return struct.pack(REC_FORMAT, unpack(r, 1, REC_FIELDS))
end
"""


_FIELD_RE: Final = re.compile(r"\br\.([A-Za-z_]\w*)")
_INDEX: Final = {name: i + 1 for i, name in enumerate(NAMES)}


def compile(script: str) -> str:
    """Rewrite ``r.<field>`` to ``r[<index>]``; an unknown field name is an error here, at
    start-up, instead of a nil in the middle of a batch."""

    def index(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in _INDEX:
            raise ValueError(f"Lua refers to unknown record field r.{name}")
        return f"r[{_INDEX[name]}]"

    return _FIELD_RE.sub(index, script)

"""The layout of a *segment* (the events of one agent and one run in a batch, folded), shared by
the Python folds (segments.py, fold.py), the fast path (fastpath.py) and the update script
(state.py; Lua indexes are these + 1).

A segment's numbers travel to Lua as one packed binary string for the whole batch (one
struct.unpack per segment in Lua, instead of decoding ~40 msgpack values); the few other fields
as a msgpack list.
"""

from __future__ import annotations

import hashlib
from typing import Final

SEGMENT_NUMBERS: Final = (
    "PROFILE", "RUN", "LO", "HI", "FIRST", "LAST", "START", "IV", "CHILD", "BEAT", "NBEAT", "PULSE",
    "XU", "XBEAT", "STACKMS", "PGAP", "GA", "GB", "FBEAT", "PBF", "PSB", "BA", "BB",
    "TN", "TSUM", "TMAX", "TW", "CN", "CSUM", "CMAX", "CW", "FPH", "FPC", "WS", "WT", "RMS", "RKB",
    "UN", "TMIN", "CMIN", "NEV", "INDEX",
)  # fmt: skip
SEGMENT_OTHERS: Final = ("AGENT", "EXIT", "FPTEXT", "FPX", "RSSX", "STACK", "WINX", "BEATX")
(S_PROFILE, S_RUN, S_LO, S_HI, S_FIRST, S_LAST, S_START, S_IV, S_CHILD, S_BEAT, S_NBEAT, S_PULSE,
 S_XU, S_XBEAT, S_STACKMS, S_PGAP, S_GA, S_GB, S_FBEAT, S_PBF, S_PSB, S_BA, S_BB,
 S_TN, S_TSUM, S_TMAX, S_TW, S_CN, S_CSUM, S_CMAX, S_CW, S_FPH, S_FPC, S_WS, S_WT, S_RMS, S_RKB,
 S_UN, S_TMIN, S_CMIN, S_NEV, S_INDEX,
 S_AGENT, S_EXIT, S_FPTEXT, S_FPX, S_RSSX, S_STACK, S_WINX, S_BEATX) = range(50)  # fmt: skip
# IV: the interval the segment's events declare (the last one that does: a start, or a pulse
# repeating it; -1: none). GA..GB: the longest gap between two events of the segment; BA..BB:
# the longest gap between two beats with a pulse in between; FBEAT: the first beat; PBF: a pulse
# came before it; PSB: a pulse came since the last beat (bookkeeping for BA..BB). NEV: events.
# TN..TW and CN..CW: the tokens and cost folds (count, sum, max, EWMA term; count 0: none), with
# TMIN/CMIN the smallest, and UN the beats with either (usage). Lists are run-length encoded and
# start in numbers, so the common segment (one beat, one pulse) carries no list at all:
# FPH/FPC/FPTEXT the first run of equal fingerprints and FPX the others ([hash, count, text,
# ...]); WS/WT the tokens of the first rate window and WINX the others; RMS/RKB the first RSS
# sample (KiB) and RSSX the others. BEATX: with more than one usage beat, each one's
# [ms, tokens, cost] (-1: not given), for the script to judge them one by one where the
# folded numbers cannot decide (tokens.py). INDEX: position in the batch.
NUMBERS: Final = len(SEGMENT_NUMBERS)
TOKEN_NUMBERS: Final = (
    S_TN, S_TSUM, S_TMAX, S_TW, S_CN, S_CSUM, S_CMAX, S_CW, S_WS, S_WT, S_UN, S_TMIN, S_CMIN,
)  # fmt: skip
"""The numbers the batch-wide token folds write (fold.ewma_terms, fold.rate_windows)."""
FP_TEXT_CHARS: Final = 80
"""How much of a looping fingerprint the loop alert quotes."""


def segment_lua() -> str:
    names = [*SEGMENT_NUMBERS, *SEGMENT_OTHERS]
    lines = [f"local S_{name} = {i + 1}" for i, name in enumerate(names)]
    lines.append(
        f"local SEG_FORMAT, SEG_NUMBERS, SEG_OTHERS = '<{'d' * NUMBERS}', {NUMBERS}, {len(SEGMENT_OTHERS)}"
    )
    lines.append(f"local SEG_SIZE = {NUMBERS * 8}")
    return "\n".join(lines)


RUN_HASHES: Final[dict[str, int]] = {}


def run_hash(run: str) -> int:
    """48 bits of BLAKE2b: exact as a Lua number, the same on every worker. A segment's RUN,
    and the CHILD of a child run's start (the hash of the ``parent`` it names; 0: none)."""
    value = RUN_HASHES.get(run)
    if value is None:
        value = int.from_bytes(hashlib.blake2b(run.encode(), digest_size=6).digest(), "big")
        if len(RUN_HASHES) > 100_000:
            RUN_HASHES.clear()
        RUN_HASHES[run] = value
    return value

"""Child runs: worker processes of an agent (``os.fork``, ``multiprocessing`` pools), and their
silent deaths.

The model (PROTOCOL.md, docs/producer.md): every process reports as its own *run* of the same
agent; a child's ``start`` names its ``parent`` run. The batch update (state.py) keeps a record
per child run of the agent's current run in the shard's ``children`` hash and counts the child's
beats for the agent's tokens, cost and token/loop detection. This module decides the one thing
about children the batch cannot: a child that stopped sending anything (SIGKILL, the OOM killer)
while its parent lives on. Such a pool looks healthy to the parent's beats, yet the work the dead
worker held never comes back (``multiprocessing.Pool`` waits for it forever).

* A child that sent an ``exit`` (any reason: a pool retiring its workers with ``close()`` or
  ``terminate()``, a worker that finished) ended on purpose: nothing is raised.
* A child silent for the agent's silence allowance (``[detectors.silence] after``, or 3 x the
  child's interval if longer) while its parent run is still the agent's run and was seen since
  opens one ``child`` incident per agent: "bot: worker process 4711 (run 9f2c..., child of run
  1a2b...) gone without a goodbye". Later dead children of the same run while it is open are
  named in the log only.
* The incident resolves when the agent starts a new run, retires or exits: the dead worker's
  run is over.

Child facts (run id, parent run id, pid, host) are recorded here from child ``start`` events.
Both hashes are pruned: children that exited a minute ago, children of runs that are over.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Final

from agentwatch.alerts import Incidents
from agentwatch.codec import Event
from agentwatch.config import format_duration
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import Client
from agentwatch.worker import Handler, Message
from detectors import record, state
from detectors.layout import run_hash

log = logging.getLogger("agentwatch.detectors.children")

DETECTOR: Final = "child"
"""The ``detector`` name of the alerts about a worker process that died silently."""
CHECK_EVERY_MS: Final = 1000
KEEP_EXITED_MS: Final = 60_000
"""How long the record of a child that exited stays (a late batch of its events finds it)."""
MAX_CHILDREN: Final = 100_000
"""Child records looked at per shard and check: a bound on a fleet that forks without end."""


class ChildWatch(Handler[Event]):
    """Detector-worker handler: records child facts, raises and ends ``child`` incidents."""

    name = "children"

    def __init__(self, client: Client, keys: Keys, incidents: Incidents, after_s: float | None,
                 severity: str = "error") -> None:  # fmt: skip
        """``after_s``: the silence detector's ``after`` (None: silence is disabled, and so is
        this check: a child's death is a silence of its own)."""
        self.client: Any = client
        self.keys = keys
        self.incidents = incidents
        self.after_ms = None if after_s is None else int(after_s * 1000)
        self.severity = severity
        self._next = 0

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        by_shard: dict[int, dict[str, str]] = {}
        for entry_id, event in messages:
            parent = event.get("parent")
            if event["kind"] != "start" or not isinstance(parent, str):
                continue
            agent = event["agent"]
            fact = {"run": event["run"], "parent": parent, "pid": event.get("pid"), "host": event.get("host"),
                    "started_ms": int(entry_id[: entry_id.index(b"-")])}  # fmt: skip
            field = f"{agent}|{run_hash(event['run'])}"
            by_shard.setdefault(shard_of(agent, self.keys.shards), {})[field] = json.dumps(fact)
        for shard, mapping in by_shard.items():
            self.client.hset(self.keys.child_facts(shard), mapping=mapping)

    def on_tick(self, now_ms: int) -> None:
        if self.after_ms is None or now_ms < self._next:
            return
        self._next = now_ms + CHECK_EVERY_MS
        for shard in range(max(self.keys.shards, 1)):
            self._check(shard, now_ms)

    def _check(self, shard: int, now_ms: int) -> None:
        assert self.after_ms is not None
        children = self.client.hgetall(self.keys.children(shard))
        if not children:
            self._resolve_over(shard, now_ms)
            return
        found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for raw_key, raw in list(children.items())[:MAX_CHILDREN]:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            try:
                child = json.loads(raw)
            except ValueError:
                child = None
            if not isinstance(child, dict):
                self._forget(shard, [key])
                continue
            found.setdefault(key.rpartition("|")[0], []).append((key, child))
        records = state.read_agents(self.client, self.keys, list(found))
        stale: list[str] = []
        for agent, entries in found.items():
            rec = records.get(agent)
            for key, child in entries:
                last = int(child.get("last") or 0)
                if rec is None or not rec["run"]:  # the parent's own start may still come
                    if now_ms - last > 10 * KEEP_EXITED_MS:
                        stale.append(key)
                    continue
                over = not _running(rec, child.get("p"))
                if child.get("ex"):
                    if now_ms - last > KEEP_EXITED_MS or over:
                        stale.append(key)
                    continue
                if over:
                    stale.append(key)
                    continue
                allowance = max(self.after_ms, int(3000 * float(child.get("iv") or 0)))
                assert rec is not None
                if now_ms - last > allowance and int(rec["seen"]) > last + allowance // 2:
                    self._dead(shard, key, child, now_ms, allowance)
                    stale.append(key)
        if stale:
            self._forget(shard, stale)
        self._resolve_over(shard, now_ms, records)

    def _dead(self, shard: int, key: str, child: dict[str, Any], now_ms: int, allowance: int) -> None:
        agent = key.rpartition("|")[0]
        raw = self.client.hget(self.keys.child_facts(shard), key)
        fact = json.loads(raw) if raw else {}
        pid, run, parent = fact.get("pid"), fact.get("run", "?"), fact.get("parent", "?")
        silent_s = (now_ms - int(child.get("last") or 0)) / 1000
        summary = (f"{agent}: worker process {pid if pid is not None else '?'} (run {run}, child of run "
                   f"{parent}) gone without a goodbye: no event for {format_duration(silent_s)} while its "
                   "parent kept running (SIGKILL, OOM killer?)")  # fmt: skip
        details = {"pid": pid, "run": run, "parent": parent, "host": fact.get("host"),
                   "silent_s": round(silent_s, 3), "allowance_s": allowance / 1000}  # fmt: skip
        self.client.hset(self.keys.child_facts(shard), f"dead:{agent}", str(child.get("p") or ""))
        at_ms = int(child.get("last") or now_ms) + allowance
        fired = self.incidents.fire(agent, DETECTOR, severity=self.severity, summary=summary, at_ms=at_ms,
                                    details=details)  # fmt: skip
        if fired is None:
            log.warning("%s (a child incident of this agent is open already)", summary)

    def _forget(self, shard: int, keys: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hdel(self.keys.children(shard), *keys)
        pipe.hdel(self.keys.child_facts(shard), *keys)
        pipe.execute()

    def _resolve_over(
        self, shard: int, now_ms: int, records: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """End the ``child`` incidents whose parent run is over (a new run, retired, exited)."""
        suffix = f"/{DETECTOR}"
        open_here = [
            (key.decode() if isinstance(key, bytes) else key)
            for key in self.client.hkeys(self.keys.incidents(shard))
        ]
        agents = [key[: -len(suffix)] for key in open_here if key.endswith(suffix)]
        if not agents:
            return
        missing = [agent for agent in agents if records is None or agent not in records]
        if missing:
            records = {**(records or {}), **state.read_agents(self.client, self.keys, missing)}
        assert records is not None
        facts = self.keys.child_facts(shard)
        parents = self.client.hmget(facts, [f"dead:{agent}" for agent in agents])
        for agent, raw in zip(agents, parents, strict=True):
            rec = records.get(agent)
            parent = raw.decode() if isinstance(raw, bytes) else (raw or "")
            if _running(rec, parent):
                continue
            how = "retired or exited" if rec is not None and _run(rec) == parent else "replaced by a new run"
            summary = f"{agent}: the run whose worker died is over ({how})"
            self.incidents.resolve(agent, DETECTOR, summary=summary, at_ms=now_ms)
            self.client.hdel(facts, f"dead:{agent}")


def _running(rec: dict[str, Any] | None, parent: object) -> bool:
    """Is ``parent`` (a run hash as text) still the agent's run, neither retired nor exited?"""
    if rec is None or rec["flags"] & (record.RETIRED | record.EXITED):
        return False
    return _run(rec) == parent


def _run(rec: dict[str, Any]) -> str:
    """A record's run hash as the children hash writes it (an exact integer, as text)."""
    return f"{int(rec['run'])}"

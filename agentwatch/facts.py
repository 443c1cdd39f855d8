"""What an agent said about itself when it started: run id, host, pid, version, interval.

Detector state keeps only what decisions need (a hash of the run id, not the id; no host). The
operator views and the restart notifier need the plain facts: ``agentwatch status`` shows host
and pid, reports need when an agent was first seen, and ``restart`` substitutes ``{run}``,
``{host}`` and ``{pid}``. ``start`` events are rare (one per process run), so keeping them costs
nothing on the hot path: the handler looks at ``kind`` and moves on.

Idempotent and order-proof: a start only replaces the facts if its entry is newer than the one
they came from (a reclaimed, older batch cannot roll them back), and ``first_ms`` only moves
earlier.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Final

from agentwatch import labels
from agentwatch.codec import Event
from agentwatch.keys import Keys, shard_of
from agentwatch.redisconn import Client
from agentwatch.worker import Handler, Message

log = logging.getLogger("agentwatch.facts")

# KEYS[1] = facts hash; ARGV = agent, entry ms, entry seq, facts JSON (no first_ms), repeated.
# Newer means a later entry id (ms, then sequence): two starts in one millisecond keep order.
_RECORD: Final = """
for i = 1, #ARGV, 4 do
  local agent, at, eseq = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local new = cjson.decode(ARGV[i + 3])
  local raw = redis.call('HGET', KEYS[1], agent)
  local first = at
  if raw then
    local cur = cjson.decode(raw)
    first = math.min(tonumber(cur.first_ms) or at, at)
    local cur_at, cur_seq = tonumber(cur.started_ms), tonumber(cur.entry_seq) or 0
    if cur_at > at or (cur_at == at and cur_seq >= eseq) then
      new = cur
    end
  end
  new.first_ms = first
  redis.call('HSET', KEYS[1], agent, cjson.encode(new))
end
return 1
"""
_FACT_KEYS: Final = ("run", "host", "pid", "pid_start", "version", "interval", "parent")
LABELS_DROPPED: Final = "detectors:labels_dropped"
"""Field of the pipeline's stats hash: label pairs refused (bad charset, too long, over the cap)."""


class FactsRecorder(Handler[Event]):
    """Detector-worker handler: records each agent's latest start facts (see module docstring)."""

    name = "facts"

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client: Any = client
        self.keys = keys
        self._script = self.client.register_script(_RECORD)

    def on_batch(self, messages: Sequence[Message[Event]]) -> None:
        by_shard: dict[int, list[str]] = {}
        dropped_total = 0
        for entry_id, event in messages:
            if event["kind"] != "start" or event.get("parent"):
                continue  # a forked worker's start does not speak for the agent
            at, _, entry_seq = entry_id.decode().partition("-")
            facts: dict[str, Any] = {key: event[key] for key in _FACT_KEYS if key in event}
            facts["started_ms"], facts["entry_seq"] = int(at), int(entry_seq)
            if "labels" in event:
                kept, dropped = labels.clean(event["labels"])
                facts["labels"] = kept
                if dropped:
                    facts["labels_dropped"] = len(dropped)
                    dropped_total += len(dropped)
                    log.warning("agent %r: dropped %d label(s): %s", event["agent"], len(dropped),
                                "; ".join(dropped))  # fmt: skip
            args = by_shard.setdefault(shard_of(event["agent"], self.keys.shards), [])
            args += [event["agent"], at, entry_seq, json.dumps(facts, separators=(",", ":"))]
        for shard, args in by_shard.items():
            self._script(keys=[self.keys.facts(shard)], args=args)
        if dropped_total:
            self.client.hincrby(self.keys.stats, LABELS_DROPPED, dropped_total)


def read_facts(client: Client, keys: Keys, agents: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """agent -> facts (``run``, ``host``, ``pid``, ``version``, ``interval``, ``started_ms``,
    ``first_ms``), for ``agents`` or for every agent with facts."""
    redis: Any = client
    out: dict[str, dict[str, Any]] = {}
    for shard in range(max(keys.shards, 1)):
        if agents is None:
            pairs = redis.hgetall(keys.facts(shard)).items()
        else:
            names = [a for a in agents if shard_of(a, keys.shards) == shard]
            pairs = zip(names, redis.hmget(keys.facts(shard), names) if names else [], strict=True)
        for name, raw in pairs:
            if raw:
                out[name.decode() if isinstance(name, bytes) else name] = json.loads(raw)
    return out


def labels_of(fact: dict[str, Any]) -> dict[str, str]:
    """The labels of an agent from its start facts: what its run sent, plus ``host``."""
    return labels.effective(fact.get("labels"), fact.get("host"))

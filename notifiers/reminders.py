"""``repeat = "4h"``: remind while an incident stays firing.

When a notifier with ``repeat`` queues (or a mute holds back) a ``firing`` alert, its dedup key
goes into a sorted set scored by when the first reminder is due; a ``resolved`` alert takes it
out. On every tick a worker pops the due reminders (one Lua step, so two workers never pop the
same one), checks the incident is still open *with the same firing alert*, and queues a copy of
that alert with its own id, ``details.reminder = n`` and ``details.firing_for_s``. Reminders go
through mutes like any alert: one due while muted is recorded, not sent, and the schedule goes on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Final

from agentwatch.alerts import Alert
from agentwatch.keys import Keys
from agentwatch.redisconn import Client

# The alert JSON is passed through untouched (cjson would reformat numbers and turn [] into {}).
_POP_DUE: Final = """
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
local out = {}
for _, key in ipairs(due) do
  local raw = redis.call('HGET', KEYS[2], key)
  if raw then
    local n = redis.call('HINCRBY', KEYS[2], 'n:' .. key, 1)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), key)
    table.insert(out, raw)
    table.insert(out, n)
  else
    redis.call('ZREM', KEYS[1], key)
  end
end
return {now, out}
"""


class Reminders:
    def __init__(self, client: Client, keys: Keys, notifier: str, every_s: float) -> None:
        self.client: Any = client
        self.due = keys.notifier_repeat(notifier)
        self.alerts = keys.notifier_repeat_alerts(notifier)
        self.every_ms = int(every_s * 1000)
        self._pop = self.client.register_script(_POP_DUE)

    def schedule(self, alert: Alert) -> None:
        pipe = self.client.pipeline(transaction=True)  # both keys share the notifier's tag
        pipe.hset(self.alerts, alert.dedup_key, alert.to_json())
        pipe.hdel(self.alerts, f"n:{alert.dedup_key}")
        pipe.zadd(self.due, {alert.dedup_key: alert.at_ms + self.every_ms})
        pipe.execute()

    def cancel(self, dedup_key: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.due, dedup_key)
        pipe.hdel(self.alerts, dedup_key, f"n:{dedup_key}")
        pipe.execute()

    def pop_due(self) -> tuple[int, list[tuple[Alert, int]]]:
        """(server time ms, [(the firing alert, reminder number)]) for reminders now due."""
        now, raw = self._pop(keys=[self.due, self.alerts], args=[self.every_ms])
        out = []
        for index in range(0, len(raw), 2):
            out.append((Alert(**json.loads(raw[index])), int(raw[index + 1])))
        return int(now), out


def reminder_of(alert: Alert, n: int, now_ms: int) -> Alert:
    """The n-th reminder of a firing alert: its own id (so it is delivered, not de-duplicated)."""
    firing_for_s = max(0, (now_ms - alert.at_ms) // 1000)
    details = {**alert.details, "reminder": n, "firing_for_s": firing_for_s, "first_alert": alert.id}
    return replace(alert, id=f"{alert.id}-r{n}", details=details,
                   summary=f"{alert.summary} (still firing, reminder {n})")  # fmt: skip

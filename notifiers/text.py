"""Alerts as text a person reads (Slack, apprise targets), with agent-supplied text kept literal.

A summary, an error message or a stack comes from whoever can write an event, so it must never
turn into markup: in Slack, ``<!channel>`` pings a whole channel and ``<https://evil|Runbook>``
is a link that shows one address and opens another. Slack's own rule is to escape ``&``, ``<``
and ``>`` in every text it parses (https://api.slack.com/reference/surfaces/formatting#escaping);
after that neither can exist. A stack sits in a code block whose fence it must not close.

For apprise, :func:`plain_text` is handed over as *text* (``body_format=text``) and apprise
converts it to each target's own format, escaping as it goes (HTML entities for e-mail, CommonMark
backslashes for Markdown services, Slack's three entities for Slack), so no target receives agent
text as markup. Control characters (a terminal escape in an exception message) are shown as
``\\x1b``-style escapes in both.
"""

from __future__ import annotations

import re
from typing import Final

from agentwatch.alerts import Alert

STACK_CHARS: Final = 1500
HELD_NAMED: Final = 10
"""Held dependents a parent's message names (``details.held`` lists up to 100)."""
_ICONS: Final = {"firing": ":red_circle:", "resolved": ":large_green_circle:"}
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""C0/C1 controls but newline and tab, and the Unicode line separators and bidi overrides that
make text display other than it reads."""


def visible(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``, ``\\u202e``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def slack_escape(text: str) -> str:
    """Slack's escaping: ``&``, ``<`` and ``>`` as entities, so no mention or link can form."""
    return visible(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _inline_code(text: str) -> str:
    return "`" + slack_escape(text).replace("`", "'") + "`"


def slack_text(alert: Alert) -> str:
    """One Slack message a human reads on a phone: what, who, how bad; the stack when there is one."""
    icon = _ICONS.get(alert.status, "")
    severity, summary, at = (slack_escape(text) for text in (alert.severity, alert.summary, alert.at))
    text = f"{icon} *{alert.status.upper()}* [{severity}] {summary}\n"
    text += f"agent {_inline_code(alert.agent)} · detector {_inline_code(alert.detector)} · {at}"
    held = _held(alert)
    if held:
        names = ", ".join(f"{_inline_code(agent)} ({slack_escape(detector)})" for agent, detector in held[0])
        text += f"\n{_held_words(alert, held[1])}: {names}{_more(held[2])}"
    stack = _stack(alert)
    if stack:
        # A run of three backticks would close the fence: break every run with a zero-width space.
        text += "\n```" + slack_escape(stack).replace("``", "`\u200b`") + "```"
    return text


def plain_text(alert: Alert) -> str:
    """The same message without any markup, for apprise to convert per target."""
    text = f"{alert.status.upper()} [{alert.severity}] {alert.summary}\n"
    text += f"agent {alert.agent} · detector {alert.detector} · {alert.at}"
    held = _held(alert)
    if held:
        names = ", ".join(f"{agent} ({detector})" for agent, detector in held[0])
        text += f"\n{_held_words(alert, held[1])}: {names}{_more(held[2])}"
    stack = _stack(alert)
    if stack:
        text += "\n\n" + stack
    return visible(text)


def _held(alert: Alert) -> tuple[list[tuple[str, str]], int, int] | None:
    """(the first :data:`HELD_NAMED` dependents held for this parent as (agent, detector), how
    many in all, how many not named) from ``details.held`` (notifiers/holds.py), or None."""
    held = alert.details.get("held")
    if not isinstance(held, list) or not held:
        return None
    items = [item for item in held if isinstance(item, dict)]
    pairs = [(str(item.get("agent", "")), str(item.get("detector", ""))) for item in items]
    more = alert.details.get("held_more")
    total = len(pairs) + (more if isinstance(more, int) and not isinstance(more, bool) and more > 0 else 0)
    return pairs[:HELD_NAMED], total, total - len(pairs[:HELD_NAMED])


def _held_words(alert: Alert, count: int) -> str:
    noun = "dependent" if count == 1 else "dependents"
    if alert.status == "resolved":
        return f"held while it was down: {count} {noun}, each now with a fresh allowance"
    return f"holding the silence of {count} {noun}"


def _more(count: int) -> str:
    return f" and {count} more" if count > 0 else ""


def _stack(alert: Alert) -> str:
    stack = alert.details.get("stack")
    if isinstance(stack, str) and stack and alert.status == "firing":
        return stack[-STACK_CHARS:]
    return ""

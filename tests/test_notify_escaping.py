"""Agent-supplied text reaches people literally: Slack and apprise targets get it escaped by their
own rules, so an exception message cannot ping a channel, show a disguised link or inject markup.

Real notifier workers deliver to a real HTTP receiver; the alerts carry what an agent can put in
an ``exit`` error or a pulse's stack.
"""

from __future__ import annotations

import pytest
import redis

from agentwatch.keys import Keys
from notifiers.text import plain_text, slack_text

from notify_kit import fire, notifier_running, pipeline_with, receiver

HOSTILE = "boom <!channel> see <https://evil.example|the runbook> & <@U024BE7LH> *now* \x1b]0;pwned\x07"
STACK = 'File "a.py"\n```\n<!here> closed the fence?\n'


def test_slack_messages_escape_agent_text_by_slacks_rules(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str
) -> None:
    entry = {"type": "webhook", "url": "", "format": "slack", "backoff": "50ms"}
    with receiver() as hook:
        pipeline = pipeline_with(prefix, redis_url, [{**entry, "url": hook.url}])
        with notifier_running(pipeline, redis_url):
            alert = fire(r, keys, "bot-x", "stall", summary=HOSTILE, details={"stack": STACK})
            (request,) = hook.wait_requests(1)
    text = request.json()["text"]
    assert text == slack_text(alert)
    # No mention, no link: Slack parses only <...>, and none survives.
    assert "<" not in text and ">" not in text
    assert "&lt;!channel&gt;" in text and "&lt;https://evil.example|the runbook&gt;" in text
    assert "&amp;" in text and "&lt;!here&gt;" in text
    # The stack's fence stays closed exactly where we close it, and the terminal escape is visible.
    assert text.count("```") == 2 and text.endswith("closed the fence?\n```")
    assert "\x1b" not in text and "\\x1b]0;pwned\\x07" in text


@pytest.mark.apprise
@pytest.mark.parametrize(
    ("fmt", "escaped", "raw"),
    [("html", ["&lt;!channel&gt;", "&lt;https://evil.example|the&nbsp;runbook&gt;", "&amp;"],
      ["<!channel>", "<https"]),
     ("markdown", ["\\*now\\*", "<\\!channel\\>"], ["*now*", "<!channel>"]),
     ("text", ["<!channel>", "*now*"], [])],
)  # fmt: skip
def test_apprise_targets_get_agent_text_escaped_in_their_own_format(
    r: redis.Redis, keys: Keys, prefix: str, redis_url: str, fmt: str, escaped: list[str], raw: list[str]
) -> None:
    with receiver() as hook:
        url = hook.url.replace("http://", "json://") + f"?format={fmt}"
        entry = {"type": "apprise", "urls": [url], "backoff": "50ms", "timeout": "5s"}
        with notifier_running(pipeline_with(prefix, redis_url, [entry]), redis_url):
            alert = fire(r, keys, "bot-x", "stall", summary=HOSTILE, details={"stack": STACK})
            (request,) = hook.wait_requests(1)
    message = request.json()["message"]
    for needle in escaped:
        assert needle in message, (needle, message)
    for needle in raw:
        assert needle not in message, (needle, message)
    assert "\x1b" not in message and "x1b" in message  # shown, not obeyed
    if fmt == "text":
        assert message == plain_text(alert).strip()  # apprise strips the ends

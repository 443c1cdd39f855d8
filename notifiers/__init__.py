"""Built-in notifiers. Each is a plugin fed by the alerts stream; see notifiers/base.py.

``BUILTINS`` is the one place that maps a ``type = "<alias>"`` of a ``[[notifiers]]`` entry to the
class implementing it.
"""

BUILTINS: dict[str, str] = {
    "webhook": "notifiers.webhook:Webhook",
    "pagerduty": "notifiers.pagerduty:PagerDuty",
    "restart": "notifiers.restart:Restart",
    "apprise": "notifiers.apprise_notifier:Apprise",
}

"""Show progress while a replicator task waits: the `lines` of each retry's result
(replicator_wait in an `until` loop returns one line per link)."""

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: replicator_progress
type: aggregate
short_description: Progress lines of replicator tasks that retry
description:
  - On every retry of a task whose result has C(lines), prints them, one per link.
requirements:
  - enabled in ansible.cfg (callbacks_enabled = replicator_progress)
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "replicator_progress"
    CALLBACK_NEEDS_ENABLED = True

    def v2_runner_retry(self, result):
        for line in result._result.get("lines") or []:
            self._display.display(f"  {line}")

# Copyright: (c) 2026, The replicator team
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Show progress while a replicator task waits: the `lines` of each retry's result
(replicator_wait in an `until` loop returns one line per link)."""

DOCUMENTATION = r"""
name: replicator_progress
type: aggregate
short_description: Progress lines of replicator tasks that retry
description:
  - On every retry of a task whose result has C(lines), prints them, one per link.
requirements:
  - enabled in ansible.cfg (callbacks_enabled = voltrail.replicator.replicator_progress)
author: [The replicator team (@voltrail)]
"""

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "replicator_progress"
    CALLBACK_NEEDS_ENABLED = True

    def v2_runner_retry(self, result):
        for line in result._result.get("lines") or []:
            self._display.display(f"  {line}")

"""Hook commands an operator configures around a consistent point: a freeze (fsfreeze
-f, a database's checkpoint) before it and a thaw after it, run with `sh -c`, with a
deadline (killed past it). Used by watched groups' epochs and by markers."""

from __future__ import annotations

import asyncio
import os
import signal


class HookError(Exception):
    """A hook failed or timed out; the message says which and how."""


async def run_hook(what: str, command: str, timeout: float) -> None:
    """Run `command`; past `timeout` its whole process group is killed (a compound
    command's children too: an orphaned `fsfreeze -f` after the thaw ran would freeze
    the file system with no thaw to come)."""
    proc = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: our children only
        except ProcessLookupError:
            pass
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise HookError(f"{what} hook {command!r} did not finish in {timeout:g}s "
                        "(killed)") from None
    if proc.returncode:
        raise HookError(f"{what} hook {command!r} exited {proc.returncode}: "
                        f"{out.decode(errors='replace').strip()[-500:]}")

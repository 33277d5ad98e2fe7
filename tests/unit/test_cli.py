"""The command line's own comfort: --version, and shell completion through argcomplete,
tested through a real bash running the shell code `replicator completion bash` prints
(which talks to the console script over argcomplete's fd 8 protocol)."""

import os
import shlex
import subprocess
import sys
from importlib.metadata import version

import pytest

import replicator
from replicator.cli import format_event

BIN = os.path.dirname(sys.executable)  # the venv's bin: the console script is there
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def test_version():
    out = subprocess.run(["replicator", "--version"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"replicator {version('replicator')}\n"
    assert replicator.__version__ == version("replicator")


def complete(line: str) -> list[str]:
    """What bash offers after `line` (the cursor at its end), through the completion
    function that `replicator completion bash` registers."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    script = "\n".join([
        'source <(replicator completion bash)',
        'complete -p replicator >&2',  # registered, or this fails
        f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}",
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}",
        "_python_argcomplete replicator",
        "printf '%s\\n' \"${COMPREPLY[@]}\""])
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, env=ENV, timeout=60)
    assert out.returncode == 0 and "_python_argcomplete replicator" in out.stderr, out.stderr
    return sorted(w.strip() for w in out.stdout.splitlines() if w.strip())


@pytest.mark.parametrize("line, want", [
    ("replicator sta", ["status"]),
    ("replicator re", ["reload", "reparent", "resolve", "restore", "resync", "rewind"]),
    ("replicator agent --log-format ", ["json", "text"]),
    ("replicator config check --j", ["--json"]),
    ("replicator completion ", ["--help", "-h", "bash", "fish", "zsh"]),
])
def test_bash_completes_subcommands_options_and_choices(line, want):
    assert complete(line) == want


def test_completion_shell_code_for_each_shell():
    for shell in ("bash", "zsh", "fish"):
        out = subprocess.run(["replicator", "completion", shell], capture_output=True,
                             text=True, env=ENV)
        assert out.returncode == 0 and "replicator" in out.stdout, out.stderr
    out = subprocess.run(["replicator", "completion", "csh"], capture_output=True, text=True,
                         env=ENV)
    assert out.returncode == 2 and "invalid choice: 'csh'" in out.stderr


def test_events_show_byte_counts_as_sizes():
    line = format_event({"seq": 5, "time": "2026-12-02T01:39:20.907Z", "kind": "resync_done",
                         "group": "db", "target": "s", "through_seq": 0,
                         "checked_bytes": 20 << 20, "sent_bytes": 1536,
                         "rate_bytes_per_s": 11.5 * (1 << 20), "initial": True})
    assert line == ("2026-12-02T01:39:20.907Z #5 db -> s resync_done through_seq=0 "
                    "checked_bytes=20.0MiB sent_bytes=1.5KiB rate_bytes_per_s=11.5MiB "
                    "initial=True")

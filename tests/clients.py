"""Real NBD clients driven from tests (qemu-io, fio, nbdcopy)."""

from __future__ import annotations

import subprocess


def run(cmd: list[str], timeout: float = 120) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    cmd = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        cmd += ["-c", c]
    out = run(cmd + [uri])
    if "error" in out.lower() or "fail" in out.lower():
        raise AssertionError(f"qemu-io reported a problem:\n{out}")
    return out


def fio(uri: str, *, rw="randwrite", bs="4k", iodepth=16, size="8M", runtime=None,
        extra=(), timeout=300) -> str:
    cmd = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--output-format=normal"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    return run(cmd + list(extra), timeout=timeout)

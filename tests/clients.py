"""Real NBD clients driven from tests (qemu-io, fio, nbdcopy)."""

from __future__ import annotations

import subprocess


def run(cmd: list[str], timeout: float = 120) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    return _qemu_io(["-f", "raw", uri], commands, read_only)


def qemu_io_tls(port: int, certs: str, export: str, *commands: str) -> str:
    """qemu-io on 127.0.0.1:PORT/EXPORT over NBD with TLS, with qemu's x509 credentials
    from the directory `certs` (ca-cert.pem, client-cert.pem, client-key.pem)."""
    return _qemu_io(["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
                     "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                                     f"server.port={port},export={export},tls-creds=tls0"],
                    commands, False)


def _qemu_io(image: list[str], commands, read_only: bool) -> str:
    cmd = ["qemu-io"] + (["-r"] if read_only else [])
    for c in commands:
        cmd += ["-c", c]
    out = run(cmd + image)
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

"""The agent's event loop: uvloop where it is installed, asyncio's own otherwise; the
parts that use the loop beyond streams (the Flusher's eventfd reader) work on both."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import pytest

from replicator.agent import event_loop
from replicator.journal.flusher import SLOTS, Flusher


def _without_uvloop(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError


def test_uvloop_when_installed():
    uvloop = pytest.importorskip("uvloop")
    new_loop, name = event_loop()
    assert name == "uvloop"
    loop = new_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_asyncio_when_uvloop_is_not_installed(monkeypatch):
    _without_uvloop(monkeypatch)
    new_loop, name = event_loop()
    assert name == "asyncio (uvloop not installed)"
    loop = new_loop()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
        assert type(loop).__module__.startswith("asyncio.")
    finally:
        loop.close()


@pytest.mark.parametrize("installed", [True, False])
def test_flusher_reaps_its_eventfd_on_the_agents_loop(tmp_path, monkeypatch, installed):
    if installed:
        pytest.importorskip("uvloop")
    else:
        _without_uvloop(monkeypatch)
    new_loop, _ = event_loop()

    async def main():
        flusher = Flusher(asyncio.get_running_loop(), log=logging.getLogger("test"))
        if flusher.mode != "aio":
            pytest.skip("Linux AIO unavailable here: the Flusher uses a thread, no eventfd")
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range(3):
                os.write(fd, b"x" * 4096)
                futs = [asyncio.get_running_loop().create_future() for _ in range(SLOTS)]
                for fut in futs:
                    flusher.fdatasync(fd, fut.set_result)
                assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [0] * SLOTS
        finally:
            os.close(fd)
            flusher.close()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())

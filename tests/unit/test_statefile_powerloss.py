"""statefile.replace after a power loss at every point (tests/crashsim.py): the file is
always a whole old or new content, never older than the last replace that returned, and
the next replace works from whatever the crash left (spare, `.old` link)."""

import json
import random

import pytest

from replicator import statefile
from tests.crashsim import CrashSim


@pytest.mark.parametrize("namespace", ["prefix", "subset"])
def test_replace_is_atomic_and_durable_at_every_crash_point(tmp_path, namespace):
    root = tmp_path / "run"
    path = root / "group.json"
    with CrashSim(root) as sim:
        for i in range(1, 8):
            body = json.dumps({"seq": i, "pad": "x" * (i * 900)}).encode()  # grows past 4 KiB
            statefile.replace(str(path), body, pad=True)
            sim.mark("saved", i)
    rec = sim.recording
    rec.verify()
    image = tmp_path / "image"
    for point in range(len(rec) + 1):
        for seed in range(6):
            img = rec.crash(point, random.Random(point * 10 + seed), namespace=namespace)
            img.materialize(str(image))
            saved = img.last_mark("saved", 0)
            target = image / "group.json"
            where = f"point {point} ({rec.call_at(point)}), seed {seed}"
            if not target.exists():
                assert saved == 0, where
            else:
                got = json.loads(target.read_bytes())["seq"]
                assert got >= saved, f"{where}: seq {got}, {saved} was saved"
            statefile.replace(str(target), json.dumps({"seq": 99}).encode(), pad=True)
            assert json.loads(target.read_bytes())["seq"] == 99, where

"""What a group keeps on disk besides the journal: the data a split-brain loser rolls
back is durable before the resync overwrites it, and state files are replaced without
fresh space (a full disk still checkpoints)."""

from __future__ import annotations

import os

from replicator.config import parse
from replicator.group import Group


def _group(tmp_path, state_dir=None, role="primary") -> Group:
    cfg = parse({"node": "p", "listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
                 "state_dir": str(state_dir or tmp_path / "state"), "tls": False,
                 "peers": {"q": "127.0.0.1:3"},
                 "groups": [{"name": "db", "role": role, "journal_size": "16MiB",
                             "source": "q" if role == "secondary" else None,
                             "volumes": [{"name": "data", "path": str(tmp_path / "d.img"),
                                          "size": "1MiB"}], "targets": []}]})
    group = Group(cfg.group("db"), cfg.state_dir)
    group.open()
    return group


def test_the_data_a_split_brain_loser_rolls_back_is_fsynced(tmp_path, monkeypatch):
    g = _group(tmp_path)
    g.volumes["data"].write(0, b"L" * 8192)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    base = g.lineage.save_diverged(7, [("data", 0, 8192)])
    assert os.path.join(base, "regions.bin") in synced
    assert os.path.join(base, "index.json") in synced
    assert base in synced  # the directory: the new names survive a crash too
    with open(os.path.join(base, "regions.bin"), "rb") as f:
        assert f.read() == b"L" * 8192


def test_a_state_file_is_replaced_over_a_spare_that_keeps_its_blocks(tmp_path):
    from replicator import statefile
    from tests.agents import fill_up, small_fs
    with small_fs(tmp_path / "fs", "1m") as mnt:
        path = os.path.join(mnt, "group.json")
        statefile.replace(path, b'{"checkpoint": 1}', pad=True)
        fill_up(mnt)
        for i in range(3):  # the file system is full: each replace reuses the spare
            statefile.replace(path, b'{"checkpoint": %d}' % (i + 2), pad=True)
        with open(path) as f:
            assert f.read().rstrip() == '{"checkpoint": 4}'
        # A crash after the rename left the old content under .old and no spare.
        os.replace(path + ".tmp", path + ".old")
        statefile.replace(path, b'{"checkpoint": 5}', pad=True)
        # A crash after the link left .old as a second name of the file itself.
        os.link(path, path + ".old")
        statefile.replace(path, b'{"checkpoint": 6}', pad=True)
        with open(path) as f:
            assert f.read().rstrip() == '{"checkpoint": 6}'
        assert sorted(os.listdir(mnt)) == ["filler", "group.json", "group.json.tmp"]

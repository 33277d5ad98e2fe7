"""The drill ledger checker, on images and ledgers built by hand."""

import json
import os

import pytest

from replicator.drill import block, ledger

BS = 4096
NBLOCKS = 64
RUN = bytes(range(16))


class Run:
    """A hand-made writer run: `write(i)` puts write i into the image, `ack(i)` logs it."""

    def __init__(self, tmp_path, iodepth=1, shuffled=True, fsync_every=100, **header):
        self.order = (block.Order.shuffled(NBLOCKS, 7) if shuffled
                      else block.Order.sequential(NBLOCKS))
        self.image = str(tmp_path / "volume.img")
        with open(self.image, "wb") as f:
            f.truncate(NBLOCKS * BS)
        self.path = str(tmp_path / "ledger.jsonl")
        self.ledger = ledger.LedgerFile(self.path, {
            "run_id": RUN.hex(), "block_size": BS, "iodepth": iodepth,
            "order": {"nblocks": NBLOCKS, "a": self.order.a, "b": self.order.b},
            **header}, fsync_every)

    def offset(self, i):
        return self.order.block(i) * BS

    def data(self, i):
        return block.encode(RUN, i, self.offset(i), BS)

    def write(self, *indices):
        with open(self.image, "r+b") as f:
            for i in indices:
                f.seek(self.offset(i))
                f.write(self.data(i))

    def ack(self, *indices):
        for i in indices:
            self.ledger.ack(i, self.offset(i), block.digest(self.data(i)))

    def overwrite(self, i, data):
        with open(self.image, "r+b") as f:
            f.seek(self.offset(i))
            f.write(data)

    def end(self, issued, reason="count"):
        self.ledger.end(reason=reason, issued=issued, acknowledged=None, error=None)
        self.ledger.close()

    def check(self):
        return ledger.check(self.path, self.image)


def test_all_acknowledged_writes_present(tmp_path, capsys):
    run = Run(tmp_path)
    run.write(*range(20))
    run.ack(*range(20))
    run.end(issued=20)
    r = run.check()
    assert r["acknowledged"] == r["present"] == 20
    assert r["missing"] == r["rpo_writes_lost"] == 0
    assert r["first_missing_index"] is None and r["missing_indices"] == []
    assert r["prefix"] is True and r["holes"] == 0
    assert r["unacknowledged_present"] == 0
    assert r["writer_stopped"] == "count" and r["ledger_truncated"] is False
    assert r["loss_window_seconds"] == r["rpo_seconds"] == 0.0
    assert ledger.main(["check", "--ledger", run.path, "--image", run.image]) == 0
    # a ledger from before flushes (no flush_every): each write was logged at its reply
    assert "acknowledged (at the reply) 20" in capsys.readouterr().out


def test_a_hole_is_a_lost_write_and_breaks_the_prefix(tmp_path, capsys):
    run = Run(tmp_path)
    run.write(*range(20))
    run.ack(*range(20))
    run.end(issued=20)
    run.overwrite(5, bytes(BS))
    r = run.check()
    assert r["missing"] == r["rpo_writes_lost"] == 1
    assert r["present"] == 19
    assert r["first_missing_index"] == 5 and r["missing_indices"] == [5]
    assert r["prefix"] is False and r["holes"] == 1
    assert r["missing_details"] == [{"index": 5, "offset": run.offset(5),
                                     "acknowledged_at": r["missing_details"][0]["acknowledged_at"],
                                     "found": "zeros"}]
    capsys.readouterr()
    assert ledger.main(["check", "--ledger", run.path, "--image", run.image, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["rpo_writes_lost"] == 1


def test_missing_tail_is_still_a_prefix(tmp_path):
    run = Run(tmp_path)
    run.write(*range(15))          # the replica got writes 0..14 only
    run.ack(*range(20))
    run.end(issued=20, reason="connection_lost")
    r = run.check()
    assert r["missing"] == 5 and r["present"] == 15
    assert r["first_missing_index"] == 15
    assert r["missing_indices"] == [15, 16, 17, 18, 19]
    assert r["prefix"] is True and r["holes"] == 0
    assert r["writer_stopped"] == "connection_lost"
    with open(run.path) as f:
        acks = [json.loads(line) for line in f][1:-1]
    assert r["loss_window_seconds"] == pytest.approx(acks[19]["time"] - acks[15]["time"],
                                                     abs=1e-5)


def test_unacknowledged_write_present_is_fine(tmp_path):
    run = Run(tmp_path)
    run.write(*range(11))          # write 10 was in flight when the primary died
    run.ack(*range(10))
    run.end(issued=11, reason="connection_lost")
    r = run.check()
    assert r["missing"] == 0 and r["present"] == 10
    assert r["unacknowledged_present"] == 1
    assert r["unacknowledged_present_indices"] == [10]
    assert r["prefix"] is True


def test_unacknowledged_present_after_a_missing_write_is_a_hole(tmp_path):
    run = Run(tmp_path)
    run.write(*range(9), 10)
    run.ack(*range(10))
    run.end(issued=11, reason="connection_lost")
    r = run.check()
    assert r["missing_indices"] == [9]
    assert r["unacknowledged_present_indices"] == [10]
    assert r["prefix"] is False and r["holes"] == 1


def test_writer_killed_mid_line(tmp_path):
    run = Run(tmp_path, fsync_every=1)
    run.write(*range(7))
    run.ack(*range(6))
    run.ledger.close()
    with open(run.path, "a") as f:   # the ack of write 6 was being appended
        f.write('{"event":"ack","index":6,"off')
    r = run.check()
    assert r["ledger_truncated"] is True and r["writer_stopped"] is None
    assert r["acknowledged"] == 6 and r["missing"] == 0
    assert r["unacknowledged_present_indices"] == [6]
    assert r["prefix"] is True


def test_deeper_queue_is_not_judged_for_prefix(tmp_path):
    run = Run(tmp_path, iodepth=4)
    run.write(0, 1, 3, 4)
    run.ack(1, 0, 3, 2)            # out of order acknowledgements
    run.end(issued=5)
    r = run.check()
    assert r["missing_indices"] == [2]
    assert r["unacknowledged_present_indices"] == [4]
    assert r["prefix"] is None and r["holes"] is None


def test_missing_writes_say_what_is_there_instead(tmp_path):
    run = Run(tmp_path, shuffled=False)    # write i at block i
    run.write(*range(4))
    run.ack(*range(4))
    run.end(issued=4)
    run.overwrite(1, block.encode(bytes(16), 9, run.offset(1), BS))
    run.overwrite(2, b"\xff" * BS)
    with open(run.image, "r+b") as f:
        f.truncate(run.offset(3) + 100)    # the image ends inside write 3's block
    found = {d["index"]: d["found"] for d in run.check()["missing_details"]}
    assert found == {1: "write 9 of run " + "00" * 16,
                     2: "other data (not an intact drill block)",
                     3: "beyond the end of the image"}


def test_ledger_is_never_overwritten(tmp_path):
    run = Run(tmp_path)
    run.end(issued=0)
    with pytest.raises(ledger.LedgerError):
        ledger.LedgerFile(run.path, {"run_id": RUN.hex()})


def _rewrite(path, transform):
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    with open(path, "w") as f:
        f.writelines(transform(lines))


@pytest.mark.parametrize("damage", [
    lambda lines: lines[:1] + ["not json\n"] + lines[1:],
    lambda lines: lines + [lines[1]],                       # a write acknowledged twice
    lambda lines: [lines[0].replace("replicator-drill-ledger/1", "other/1")] + lines[1:],
    lambda lines: lines[:1] + [lines[1].replace('"offset":', '"offset":1')] + lines[2:],
    lambda lines: lines[:-1] + [lines[-1], lines[1]],        # a record after the end
    lambda lines: [],
])
def test_damaged_ledger_is_an_error(tmp_path, damage, capsys):
    run = Run(tmp_path)
    run.write(0, 1)
    run.ack(0, 1)
    run.end(issued=2)
    _rewrite(run.path, damage)
    with pytest.raises(ledger.LedgerError):
        run.check()
    assert ledger.main(["check", "--ledger", run.path, "--image", run.image]) == 1
    assert "error" in capsys.readouterr().err


def test_missing_files_are_errors(tmp_path):
    run = Run(tmp_path)
    run.end(issued=0)
    assert ledger.main(["check", "--ledger", str(tmp_path / "nope"), "--image", run.image]) == 1
    os.unlink(run.image)
    assert ledger.main(["check", "--ledger", run.path, "--image", run.image]) == 1


def test_a_copy_taken_mid_workload_is_judged_at_its_instant(tmp_path):
    """A drill's copy is taken at `cut` while the workload goes on: the writes
    acknowledged by then must be in it, later ones may or may not be."""
    import time
    run = Run(tmp_path)
    run.ack(*range(10))
    cut = time.time()
    while time.time() <= cut:  # the next acknowledgement is strictly later
        pass
    run.ack(*range(10, 20))
    run.end(issued=20)
    run.write(*range(15))  # the copy holds 5 writes acknowledged after the cut
    r = ledger.check(run.path, run.image, acked_before=cut)
    assert r["acknowledged"] == 10 and r["acked_before"] == cut
    assert r["rpo_writes_lost"] == 0 and r["unacknowledged_present"] == 5
    assert r["prefix"] is True
    assert run.check()["rpo_writes_lost"] == 5  # without the cut they would be lost
    run.overwrite(9, bytes(BS))  # acknowledged before the cut, missing from the copy
    assert ledger.main(["check", "--ledger", run.path, "--image", run.image,
                        "--acked-before", repr(cut)]) == 3


def _retime(path, start, step=1.0):
    """Give the ack lines of a ledger the times start, start + step, ..."""
    def transform(lines):
        out, n = [], 0
        for line in lines:
            record = json.loads(line)
            if record["event"] == "ack":
                record["time"] = start + n * step
                n += 1
            out.append(json.dumps(record) + "\n")
        return out
    _rewrite(path, transform)


@pytest.mark.parametrize("on_image, rpo_seconds, window, cut_rpo", [
    (range(10), 0.0, 0.0, 0.0),        # nothing lost
    (range(6), 4.0, 3.0, 1.0),         # 6..9 lost: all acknowledged by t=105 is there
    (range(9), 1.0, 0.0, 0.0),         # only the last acknowledged write lost
    (range(1, 10), 14.0, 9.0, 11.0),   # the first lost: lost since the run began (t=95)
    ([0, 1, 2, 5, 6], 7.0, 6.0, 4.0),  # holes: the recovery point is before the first
])
def test_rpo_in_seconds(tmp_path, capsys, on_image, rpo_seconds, window, cut_rpo):
    run = Run(tmp_path, time=95.0, flush_every=2)
    run.write(*on_image)
    run.ack(*range(10))
    run.end(issued=10)
    _retime(run.path, 100.0)           # write i acknowledged at t = 100 + i
    r = run.check()
    assert r["rpo_writes_lost"] == 10 - len(on_image)
    assert r["rpo_seconds"] == rpo_seconds and r["loss_window_seconds"] == window
    ledger.main(["check", "--ledger", run.path, "--image", run.image])
    out = capsys.readouterr().out
    assert f"RPO: {rpo_seconds}s of acknowledged writes" in out
    assert "acknowledged (flushed) 10" in out
    # a copy cut at t=106.5: writes 0..6 must be there, the last acknowledgement is 106
    assert ledger.check(run.path, run.image, acked_before=106.5)["rpo_seconds"] == cut_rpo


@pytest.mark.parametrize("header, checked", [
    ({"flush_every": 8}, 10),  # up to iodepth + flush_every + 1 past the last ack line
    ({"fua": True, "flush_every": None}, 2),
    ({}, 2),                   # a ledger from before flushes: acknowledged + iodepth + 1
])
def test_without_an_end_line_the_unflushed_writes_are_bounded_by_flush_every(
        tmp_path, header, checked):
    run = Run(tmp_path, **header)
    run.write(*range(20))          # 10 flushed; 10 more written, not flushed
    run.ack(*range(10))
    run.ledger.close()             # killed: no end line
    r = run.check()
    assert r["writer_stopped"] is None and r["missing"] == 0
    assert r["unacknowledged_present_indices"] == list(range(10, 10 + checked))
    assert r["flush_every"] == header.get("flush_every")


def test_a_bad_flush_every_is_a_damaged_ledger(tmp_path):
    run = Run(tmp_path, flush_every=0)
    run.end(issued=0)
    with pytest.raises(ledger.LedgerError, match="flush_every"):
        run.check()

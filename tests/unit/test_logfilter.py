"""The agent's log filter: bursts of similar lines are collapsed and counted."""

import logging

from replicator.logfilter import MAX_KINDS, RepeatFilter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def setup(burst=3, window=10.0):
    clock = Clock()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    f = RepeatFilter(burst=burst, window=window, clock=clock)
    handler.addFilter(f)
    log = logging.getLogger(f"test.logfilter.{id(f)}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    return log, f, clock, lambda: [r.getMessage() for r in records]


def test_a_flood_of_one_kind_is_cut_to_the_burst_and_counted():
    log, f, clock, lines = setup()
    for i in range(1000):
        log.warning("NBD client %s: no export chosen; closing", i)
    assert lines() == ["NBD client 0: no export chosen; closing",
                       "NBD client 1: no export chosen; closing",
                       "NBD client 2: no export chosen; closing (more messages like this "
                       "are suppressed for up to 10s)"]
    clock.now += 10
    log.warning("NBD client %s: no export chosen; closing", "late")
    assert lines()[3:] == ["997 similar messages suppressed in 10s: NBD client %s: no export "
                           "chosen; closing", "NBD client late: no export chosen; closing"]


def test_kinds_are_logger_level_and_template():
    log, f, clock, lines = setup(burst=2)
    for i in range(5):
        log.warning("a %d", i)
        log.error("a %d", i)  # another level: another kind
        log.warning("b %d", i)
    assert len(lines()) == 6
    f.report()  # the agent's stop reports what is still counted
    assert sorted(lines()[6:]) == ["3 similar messages suppressed in 0s: a %d"] * 2 + \
        ["3 similar messages suppressed in 0s: b %d"]
    f.report()
    assert len(lines()) == 9  # counted once


def test_tracebacks_are_one_kind_by_their_first_line():
    log, f, clock, lines = setup(burst=1)
    for i in range(5):
        log.error("socket.accept() out of system resource\nsocket: <fd=%d>", i)
    assert len(lines()) == 1


def test_kinds_are_bounded():
    log, f, clock, lines = setup(burst=1)
    for i in range(MAX_KINDS + 10):
        log.info(f"distinct {i}")
    assert len(f._kinds) <= MAX_KINDS

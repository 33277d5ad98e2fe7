"""Building blocks of the disaster-recovery drill (issue 5).

- `block`: self-describing workload blocks and the seeded order they are written in.
- `nbd_client`: a small synchronous NBD client (fixed newstyle handshake, NBD_OPT_GO,
  WRITE, FLUSH).
- `ledger`: a workload writer that flushes like a database commits and logs every
  acknowledged write (covered by a completed FLUSH, or FUA), and the checker that
  measures, on a promoted replica, which acknowledged writes are missing (the RPO, in
  writes and in seconds).
- `report`: the drill report (JSON, JUnit XML, Markdown) from the drill's timeline and
  measurements, judged against the recovery objectives.
"""

"""Building blocks of the disaster-recovery drill (issue 5).

- `block`: self-describing workload blocks and the seeded order they are written in.
- `nbd_client`: a small synchronous NBD client (fixed newstyle handshake, NBD_OPT_GO).
- `ledger`: a workload writer that logs every acknowledged write, and the checker that
  measures, on a promoted replica, which acknowledged writes are missing (the RPO).
- `report`: the drill report (JSON, JUnit XML, Markdown) from the drill's timeline and
  measurements, judged against the recovery objectives.
"""

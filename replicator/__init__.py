"""Volume replication agent: captures writes over NBD, journals them per consistency
group and ships them to peer agents over TCP (see DESIGN.md in the shared docs)."""

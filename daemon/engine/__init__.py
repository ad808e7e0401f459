"""Region engine: regions and their invariants. No gRPC, no SQL.

Public, for the layers above (transports, metrics, server, config):
- engine.py: RegionEngine, the one façade they call, and what it answers
  (OpResult, RangeOutcome, EngineStatus, RegionListener);
- region.py: RegionSpec and RegionInfo, with Access, Acl and Placement;
- strategy.py: Strategy, and CHUNK_BYTES (the unit of progress);
- tickets.py: Peer, Handoff, Ticket; runner.py: ProgressCallback;
- warmpool.py: PoolSpec (the --warm-pool flag).
The rest is RegionEngine's own: table.py, creation.py, quota.py, operations.py,
rollback.py, placement.py, restore.py, rangelock.py.
"""

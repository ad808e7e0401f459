"""Region engine: regions and their invariants. No gRPC, no SQL.

The public face is RegionEngine (engine.py); the rest are its parts.
"""

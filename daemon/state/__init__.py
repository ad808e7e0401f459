"""The state store: what the daemon must remember across restarts and crashes."""

from memplug.daemon.state.store import Intent, RegionRecord, StateStore

__all__ = ["Intent", "RegionRecord", "StateStore"]

"""The streams worker: turns per-connection events into user-level presence (Faust agents)."""

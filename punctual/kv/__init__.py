"""KV cache memory: the block pool and per-request block tables (pure Python, no torch)."""

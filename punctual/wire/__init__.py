"""What crosses a socket between Punctual's processes: data under a declared schema (codec.py),
after both ends proved they hold the cluster's secret (auth.py), in length-prefixed frames
(channel.py); moved KV as raw buffers with a declared layout (kv.py). Imports nothing of the
engine: every layer may use it."""

"""Speculative decoding: proposers and the choice of how many tokens to speculate (pure Python)."""

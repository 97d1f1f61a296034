"""What a served cluster's KV moves cost, read from the cluster itself (`GET /admin/migrations`).

The offline calibration times a copy in-process (export, encoding, write): no Ray object store,
no command round trips to two cores that answer only between their steps. A served cluster's
moves pay all of that, and the cluster learns it as it goes: each move's record carries the
copy-round cost fitted so far (`cluster.migration.TransferCost`: seconds = fixed_s + per_block_s x
blocks, over every round of every move). `calibrate --server --prefill-replicas P
--decode-replicas D` keeps that fit as the profile's `kv_transfer`, so the simulator's prefill/
decode handoff (and its choice of decode replica) is priced as the cluster paid it.
"""
from __future__ import annotations

import json
import statistics
import urllib.request
from typing import Callable


def server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def migrations(base_url: str, get: Callable[[str], bytes] = http_get) -> list[dict]:
    """GET /admin/migrations: each finished move attempt, oldest first (the last 1,000)."""
    return json.loads(get(server_root(base_url) + "/admin/migrations"))


def learned_kv_transfer(moves: list[dict], bytes_per_block: float, min_observations: int = 4,
                        offline: dict | None = None) -> dict | None:
    """The profile's kv_transfer ({"fixed_s", "bytes_per_s", ...}) from a served cluster's moves,
    with `bytes_per_block` the profile's (its model's KV bytes per token x the block size), or None
    when fewer than `min_observations` moves landed (or copy rounds were seen).

    With the `offline` kv_transfer (the in-process copy `calibrate` timed), the bytes cost its
    bandwidth, and each copy round's fixed cost is what the landed moves took beyond their bytes,
    per round (the median over moves; a move pre-copies in one round when it pre-copied anything,
    then stops and copies the rest, as the simulator prices it): that fixed part is what serving
    adds (the object store, commands answered between the cores' steps). Without it, the cost the
    cluster itself learned (the latest landed move's "estimate"). The cluster's own fit cannot
    tell the two apart when every move is about the same size: a calibration of short chat
    prompts (2 blocks a move) learned 0 ms + 39 ms per block, which priced a 17-block move at
    710 ms where the cluster took 96-128 ms."""
    landed = [m for m in moves if m.get("ok")]
    common = {"source": "learned by the served cluster over its KV moves (GET /admin/migrations)",
              "learned_from_cluster": True, "num_moves": len(landed)}
    if offline is not None and offline.get("bytes_per_s"):
        timed = [m for m in landed if m.get("transfer_s") is not None]
        if len(timed) < min_observations:
            return None
        per_block_s = bytes_per_block / float(offline["bytes_per_s"])
        fixed = statistics.median(
            (m["transfer_s"] - per_block_s * (m.get("precopy_blocks", 0) + m.get("final_blocks", 0)))
            / (2 if m.get("precopy_blocks") else 1) for m in timed)
        return {**common, "fixed_s": max(0.0, fixed), "bytes_per_s": float(offline["bytes_per_s"]),
                "per_block_s": per_block_s, "fit": "fixed per round from the moves, bytes at the offline bandwidth"}
    landed = [m for m in landed if m.get("estimate")]
    if not landed:
        return None
    estimate = landed[-1]["estimate"]
    if estimate.get("observations", 0) < min_observations:
        return None
    per_block_s = max(float(estimate["per_block_s"]), 1e-12)  # a zero slope: bandwidth beyond measuring
    return {**common, "fixed_s": float(estimate["fixed_s"]), "bytes_per_s": bytes_per_block / per_block_s,
            "num_moves": len(landed), "num_rounds": estimate["observations"],
            "per_block_s": float(estimate["per_block_s"]), "fit": "the cluster's own estimate"}


def learned_from_cluster(kv_transfer: dict | None) -> bool:
    """Whether a profile's kv_transfer is a served cluster's (`learned_kv_transfer`), not an offline copy's."""
    return bool((kv_transfer or {}).get("learned_from_cluster"))

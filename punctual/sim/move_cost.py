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


def learned_kv_transfer(moves: list[dict], bytes_per_block: float, min_observations: int = 4) -> dict | None:
    """The profile's kv_transfer ({"fixed_s", "bytes_per_s", ...}) from the cost the cluster learned
    over its moves (the latest landed move's "estimate"), with `bytes_per_block` the profile's
    (its model's KV bytes per token x the block size) so that `StepProfile.transfer_seconds` gives
    back the cluster's per-block cost. None when no landed move or too few copy rounds were seen
    (the cluster still runs on its prior)."""
    landed = [m for m in moves if m.get("ok") and m.get("estimate")]
    if not landed:
        return None
    estimate = landed[-1]["estimate"]
    if estimate.get("observations", 0) < min_observations:
        return None
    per_block_s = max(float(estimate["per_block_s"]), 1e-12)  # a zero slope: bandwidth beyond measuring
    return {"fixed_s": float(estimate["fixed_s"]), "bytes_per_s": bytes_per_block / per_block_s,
            "source": "learned by the served cluster over its KV moves' copy rounds (GET /admin/migrations)",
            "learned_from_cluster": True,
            "num_moves": len(landed), "num_rounds": estimate["observations"],
            "per_block_s": float(estimate["per_block_s"])}


def learned_from_cluster(kv_transfer: dict | None) -> bool:
    """Whether a profile's kv_transfer is a served cluster's (`learned_kv_transfer`), not an offline copy's."""
    return bool((kv_transfer or {}).get("learned_from_cluster"))

"""LoRA over a cluster (replicas in this process, no Ray): an adapter load is checked by every
replica and a refusal names the replica and the problem; replicas report the adapters they hold,
which the router reads for adapter affinity."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("peft")

import punctual.cluster.launch  # noqa: E402
from hf_models import build_hf_checkpoint, build_peft_adapter  # noqa: E402
from punctual.cluster.client import ClusterClient  # noqa: E402
from punctual.cluster.inprocess import InProcessReplicas  # noqa: E402
from punctual.config import ClusterConfig, EngineConfig  # noqa: E402
from punctual.lora.request import LoRARequest  # noqa: E402
from punctual.request import EngineCoreRequest  # noqa: E402
from punctual.sampling_params import SamplingParams  # noqa: E402
from waiting import wait_until_async  # noqa: E402


def test_adapter_load_is_checked_on_every_replica(monkeypatch, tmp_path):
    base = build_hf_checkpoint(tmp_path / "base", "llama_gqa")
    good = build_peft_adapter(base, tmp_path / "good", ["q_proj", "down_proj"], 1)
    big = build_peft_adapter(base, tmp_path / "big", ["q_proj"], 2, rank=16)
    monkeypatch.setattr(punctual.cluster.launch, "RayReplicas", InProcessReplicas)
    config = EngineConfig.from_kwargs(str(base), dtype="float32", num_kv_blocks=64, block_size=4, enable_lora=True,
                                      max_loras=2, max_lora_rank=8)
    cluster = ClusterClient(config, ClusterConfig(replicas=2))
    acks, tokens = [], {}

    def on_update(update):
        acks.extend(update.pin_acks)
        for out in update.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    async def ask(send, *args):
        before = len(acks)
        send(*args)
        await wait_until_async(lambda: len(acks) > before, timeout=30, message="no answer to the load")
        return acks[before]

    async def main():
        cluster.start()
        await cluster.attach(on_update, lambda reason: None)
        try:
            ack = await ask(cluster.load_lora, LoRARequest("big", 2, str(big)))
            assert not ack.ok and ack.status == 400
            assert ack.error.startswith("replica ") and "rank 16 is above max_lora_rank 8" in ack.error
            ack = await ask(cluster.load_lora, LoRARequest("good", 1, str(good)))
            assert ack.ok, ack.error
            # Every replica holds it now, and says so in the stats the router reads.
            await wait_until_async(lambda: len(cluster.replica_stats) == 2 and all(
                s.lora_adapters == ["lora:1"] for s in cluster.replica_stats.values()), timeout=30,
                message=lambda: f"stats: {cluster.replica_stats}")
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            cluster.add_request(EngineCoreRequest("r", [5, 17, 99, 3, 250], params, arrival_time=0.0,
                                                  lora_request=LoRARequest("good", 1, str(good))))
            await wait_until_async(lambda: len(tokens.get("r", ())) == 4, timeout=30, message="no tokens")
            assert all(load.adapters == frozenset({"lora:1"}) for load in cluster.ledger.loads())
        finally:
            await cluster.shutdown()

    asyncio.run(main())

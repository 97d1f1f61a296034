"""The engine core's wire (punctual/wire, engine/messages.py): every message type survives the
trip unchanged, and anything that is not one of them is refused with a WireError, never run."""
from __future__ import annotations

import pickle
import socket
import struct
import threading

import msgpack
import pytest
import torch

from punctual.engine.messages import (COMMANDS, SCHEMA, CoreFailure, CoreInfo, CoreUpdate, KVAnswer, PinAck,
                                      decode_commands, decode_from_core, encode_commands, encode_from_core)
from punctual.engine.stats import EngineStats
from punctual.runner.kv_transfer import KVMailbox, KVPayload, from_inline, to_inline
from punctual.lora.request import LoRARequest
from punctual.request import EngineCoreOutput, EngineCoreRequest, MigratedRequest, TokenLogprobs
from punctual.sampling_params import SamplingParams
from punctual.structured.spec import StructuredOutput
from punctual.wire.auth import AuthError, authenticate_client, authenticate_server, new_secret
from punctual.wire.codec import WireError
from punctual.wire.kv import InlineKV, RELAY_SCHEMA, SharedKV, StagedKV

STATS = EngineStats(2, 1, 64, 10, 0, 7, 100, 20, prefix_cache_queries=40, prefix_cache_hits=8,
                    spec_method="ngram", output_length_rank_correlation=0.5)
PARAMS = SamplingParams(n=2, max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["\n", "end"],
                        stop_token_ids=[7], logprobs=2, prompt_logprobs=0, presence_penalty=0.5,
                        structured=StructuredOutput.json_schema({"type": "object"}), eos_token_ids=(2, 3))
REQUEST = EngineCoreRequest("req-1", [1, 2, 3, 4], PARAMS, arrival_time=12.5, priority=-1, ttft_slo_ms=200.0,
                            user="alice", cache_salt="tenant-a", tenant="a",
                            lora_request=LoRARequest("sql", 3, "/adapters/sql"))
MIGRATED = MigratedRequest(REQUEST, [9, 8], 5, num_preemptions=1)
SHARED = SharedKV("psm_abc123", 128, 2, True, (("k", 0, "int8", (2, 4, 1, 8), 0), ("k_scale", 0, "float32", (2, 4, 1), 64)))


def test_every_command_round_trips():
    commands = [
        ("add", REQUEST), ("abort", ["req-1", "req-2"]), ("shutdown", None), ("pin", ("p1", [5, 6, 7], "tenant-salt")),
        ("unpin", "p1"), ("kv_export", (1, "req-1", 0, None, True, "relay")),
        ("kv_export", (2, "req-1", 1, 3, False, "direct")), ("kv_migrate_out", (3, "req-1", 2, False, "object-store")),
        ("kv_reserve", (4, "req-1", 6)), ("kv_receive", (5, "req-1", 0, b"\x00\x01inline")),
        ("kv_commit", (6, MIGRATED, 2, SHARED)), ("kv_commit", (7, MIGRATED, 0, None)),
        ("kv_abort_import", (8, "req-1")), ("kv_discard", (9, StagedKV("123:4"))),
        ("load_lora", LoRARequest("sql", 3, "/adapters/sql")), ("unload_lora", 3),
    ]
    assert {kind for kind, _ in commands} == set(COMMANDS)
    assert decode_commands(encode_commands(commands)) == commands


def test_every_message_from_the_core_round_trips():
    info = CoreInfo(1234, "/models/tiny", 2048, 512, (2,), 4096, STATS)
    output = EngineCoreOutput("req-1", [5, 6], "stop", new_logprobs=[TokenLogprobs(5, -0.25, [(5, -0.25), (9, -2.0)])],
                              prompt_logprobs=[None, TokenLogprobs(2, -1.5, [])], first_token_time=3.25,
                              metrics={"ttft_ms": 12.0, "tpot_ms": None, "ttft_slo_met": True, "num_preemptions": 0})
    update = CoreUpdate([output, EngineCoreOutput("req-2", [1])], STATS, {"req-3": "too long"},
                        [PinAck("p1", True, num_tokens=16), PinAck("p2", False, 507, "no room")],
                        [-(1 << 63), (1 << 63) - 1], [42], {"req-4": "replica died"},
                        [KVAnswer(1, True, payload=b"raw", first_block=0, num_blocks=2, seconds=0.5, nbytes=3),
                         KVAnswer(2, True, payload=SHARED, state=MIGRATED), KVAnswer(3, False, "not running here"),
                         KVAnswer(4, True, payload=StagedKV("9:1"))])
    for message in (info, update, CoreUpdate([]), CoreFailure("Traceback ...")):
        assert decode_from_core(encode_from_core(message)) == message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relayed_kv_keeps_every_bit(dtype):
    k = [torch.randn(2, 4, 2, 8).to(dtype) for _ in range(3)]
    v = [torch.randn(2, 4, 2, 8).to(dtype) for _ in range(3)]
    payload = from_inline(to_inline(KVPayload(2, False, k, v)))
    assert payload.num_blocks == 2 and not payload.int8
    assert all(torch.equal(a, b) for a, b in zip(payload.k + payload.v, k + v))
    q = [torch.randint(-127, 128, (2, 4, 2, 8), dtype=torch.int8)]
    s = [torch.rand(2, 4, 2)]
    int8 = KVMailbox().receive(KVMailbox().send(KVPayload(2, True, q, q, s, s), "relay"))
    assert torch.equal(int8.k[0], q[0]) and torch.equal(int8.v_scale[0], s[0])


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    frame = pickle.dumps([("add", Payload())])
    with pytest.raises(WireError):
        decode_commands(frame)
    with pytest.raises(WireError):
        decode_from_core(frame)
    with pytest.raises(WireError):
        from_inline(frame)
    assert not marker.exists()


@pytest.mark.parametrize("frame, error", [
    (msgpack.packb([["exec", "print(1)"]]), "unknown command 'exec'"),
    (msgpack.packb({"add": 1}), "expected a list of commands"),
    (msgpack.packb([["abort", "req-1"]]), "abort command: expected an array"),
    (msgpack.packb([["abort", [1]]]), r"abort command\[0\]: expected text"),
    (msgpack.packb([["pin", ["p", ["1"], None]]]), "expected integers"),
    (msgpack.packb([["unpin", msgpack.ExtType(1, b"x")]]), "expected text"),
    (msgpack.packb([["kv_discard", [1, [99, "x"]]]]), "kv_discard command"),
    (encode_commands([("add", REQUEST)])[:-3], "not a msgpack message"),
])
def test_malformed_commands_name_what_is_wrong(frame, error):
    with pytest.raises(WireError, match=error):
        decode_commands(frame)


def test_a_message_that_breaks_its_own_checks_is_refused():
    raw = msgpack.unpackb(encode_commands([("add", REQUEST)]))
    params = raw[0][1][3]  # [type id, n, max_tokens, temperature, ...]
    params[3] = -1.0
    with pytest.raises(WireError, match="temperature"):
        decode_commands(msgpack.packb(raw))
    raw = msgpack.unpackb(encode_from_core(CoreFailure("x")))
    with pytest.raises(WireError, match="expected CoreInfo | CoreUpdate | CoreFailure"):
        decode_from_core(msgpack.packb([raw[0], "x", "extra"]))
    with pytest.raises(WireError, match="not in the"):
        encode_commands([("abort", [object()])])


def test_kv_buffers_are_checked_before_they_are_read():
    past_the_end = InlineKV(1, False, (("k", 0, "float32", (1, 4, 1, 8), 0),), b"\x00" * 64)
    with pytest.raises(WireError, match="ends past the buffer"):
        from_inline(RELAY_SCHEMA.pack(past_the_end))
    odd_dtype = InlineKV(1, False, (("k", 0, "object", (1,), 0),), b"\x00" * 64)
    with pytest.raises(WireError, match="dtype must be one of"):
        from_inline(RELAY_SCHEMA.pack(odd_dtype))
    with pytest.raises(WireError, match="not a shared-memory segment name"):
        KVMailbox().receive(SharedKV("../../etc/passwd", 0, 0, False, ()))


def handshake(server_secret: bytes, client_secret: bytes) -> tuple[Exception | None, Exception | None]:
    """Both ends of the handshake over a socket pair; what each raised."""
    server_end, client_end = socket.socketpair()
    errors: list[Exception | None] = [None, None]

    def serve():
        try:
            authenticate_client(server_end, server_secret, SCHEMA.fingerprint)
        except AuthError as exc:
            errors[0] = exc
        finally:
            server_end.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        authenticate_server(client_end, client_secret, SCHEMA.fingerprint, timeout_s=5.0)
    except AuthError as exc:
        errors[1] = exc
    thread.join()
    client_end.close()
    return errors[0], errors[1]


def test_the_handshake_needs_the_same_secret_on_both_ends():
    secret = new_secret()
    assert handshake(secret, secret) == (None, None)
    server_error, client_error = handshake(secret, new_secret())
    assert "did not prove it knows the cluster secret" in str(server_error)
    assert isinstance(client_error, AuthError)  # the server hung up instead of proving itself


def test_a_silent_peer_is_dropped_after_the_handshake_timeout():
    server_end, client_end = socket.socketpair()
    with pytest.raises(AuthError, match="within the handshake's time"):
        authenticate_client(server_end, new_secret(), SCHEMA.fingerprint, timeout_s=0.2)
    server_end.close()
    client_end.close()


def test_frames_carry_the_length_first():
    # One frame is an 8-byte big-endian length and a msgpack message: what a peer implements.
    from punctual.wire.channel import encode_frame

    frame = encode_frame(encode_commands, [("abort", ["a"])])
    (size,) = struct.unpack("!Q", frame[:8])
    assert size == len(frame) - 8 and msgpack.unpackb(frame[8:]) == [["abort", ["a"]]]


def test_a_malformed_frame_from_the_core_ends_only_that_connection():
    """The front end's asyncio end: a frame that does not decode marks that core dead with the
    reason (its requests fail over or end with an error), and nothing in it is run."""
    import asyncio

    from punctual.config import EngineConfig
    from punctual.engine.client import EngineCoreClient
    from punctual.wire.channel import encode_frame

    async def scenario() -> tuple[list, list[str]]:
        front, core = socket.socketpair()
        client = EngineCoreClient(EngineConfig.from_kwargs("builtin-tiny"))
        client.sock = front
        client.info = CoreInfo(1, "m", 16, 16, (), 16, STATS)
        updates, deaths = [], []
        await client.attach(updates.append, deaths.append)
        core.sendall(encode_frame(encode_from_core, CoreUpdate([EngineCoreOutput("a", [1])])))
        core.sendall(struct.pack("!Q", 4) + b"\xc1\xc1\xc1\xc1")  # 0xc1: never valid msgpack
        for _ in range(500):  # a deadline, not a timing: the loop delivers both frames promptly
            if deaths:
                break
            await asyncio.sleep(0.01)
        core.close()
        return updates, deaths

    updates, deaths = asyncio.run(scenario())
    assert [u.outputs[0].request_id for u in updates] == ["a"]
    assert deaths and "malformed frame" in deaths[0]

"""The messages between the front end and an engine core (a local core process or a cluster
replica), and their schema: every type that crosses, and the arguments of every command.

    front end -> core   a list of commands [kind, args], args as COMMANDS declares them:
                        add (an EngineCoreRequest) | abort (ids) | shutdown | pin (pin_id, token ids, cache salt)
                        | unpin (pin_id) | KV moves between replicas, each answered by a KVAnswer
                        with its op_id: kv_export, kv_migrate_out, kv_reserve, kv_receive,
                        kv_commit, kv_abort_import, kv_discard (drop a payload a called-off move
                        left). A KV payload is what the transport carries: bytes (relay: an
                        InlineKV, opaque here), a SharedKV (direct) or a StagedKV (object-store).
    core -> front end   CoreInfo once, then a CoreUpdate per step (outputs, pin answers, stats
                        when they changed), or CoreFailure

Encoded by punctual/wire (msgpack under this schema, after a mutual HMAC handshake): a frame
that is not one of these messages is refused, never executed. Pure Python (no torch): the front
end imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from punctual.engine.stats import EngineStats
from punctual.lora.request import LoRARequest
from punctual.request import EngineCoreOutput, EngineCoreRequest, MigratedRequest, TokenLogprobs
from punctual.sampling_params import SamplingParams
from punctual.structured.spec import StructuredOutput
from punctual.wire.channel import BlockingChannel
from punctual.wire.codec import Schema, WireError
from punctual.wire.kv import SharedKV, StagedKV

KVHandle = bytes | SharedKV | StagedKV


@dataclass
class CoreInfo:
    """What the core reports once it has loaded the model: the limits the front end validates against."""

    pid: int
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_request_tokens: int  # the most tokens one request can hold in the KV pool
    stats: EngineStats
    # Attention sinks: a request's KV is bounded by its sinks and window, so neither limit above
    # binds a prompt or its max_tokens.
    streaming: bool = False


@dataclass
class PinAck:
    """The core's answer to a pin or an unpin: accepted, or refused with an HTTP status and why."""

    pin_id: str
    ok: bool
    status: int = 200
    error: str | None = None
    num_tokens: int = 0


@dataclass
class KVAnswer:
    """The core's answer to a kv_* command. `payload` is what the transport carries (bytes, a
    SharedKV or a StagedKV), so the front end passes it on without decoding tensors (it never
    imports torch)."""

    op_id: int
    ok: bool
    error: str | None = None
    payload: KVHandle | None = None
    first_block: int = 0
    num_blocks: int = 0  # blocks in the payload
    state: MigratedRequest | None = None  # kv_migrate_out: the request as it leaves
    seconds: float = 0.0  # time the core spent on it (reading and encoding, or decoding and queueing the KV)
    nbytes: int = 0  # the KV's size in the transport's encoding


@dataclass
class CoreUpdate:
    """One message per core step (or per batch of commands handled while idle)."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats | None = None  # None: unchanged since the last update that carried them
    # Requests the core refused in add_request, and why (the front end answers 400).
    rejected: dict[str, str] = field(default_factory=dict)
    pin_acks: list[PinAck] = field(default_factory=list)  # answers to pin and unpin commands, in order
    # Prefix-cache block hashes indexed / evicted during the step, when the core records them (a
    # replica of a cluster: its router learns where each prefix lives). Empty otherwise.
    # SHA-256 digests (bytes), or 64-bit ints under prefix_caching_hash_algo builtin (kv.block_pool.BlockHash).
    blocks_stored: list[bytes | int] = field(default_factory=list)
    blocks_evicted: list[bytes | int] = field(default_factory=list)
    # Requests the engine lost and cannot resume (a cluster whose replica died), and why: the
    # front end ends them with an error. Never set by a core itself.
    lost: dict[str, str] = field(default_factory=dict)
    kv_answers: list[KVAnswer] = field(default_factory=list)  # answers to kv_* commands, in order


@dataclass
class CoreFailure:
    """The core crashed; its traceback, sent before the process exits."""

    reason: str


# Each command's arguments, as the core's handler unpacks them.
COMMANDS = {
    "add": EngineCoreRequest,
    "abort": list[str],
    "shutdown": None,
    "pin": tuple[str, list[int], str | None],  # pin_id, prompt token ids, cache_salt
    "unpin": str,
    "kv_export": tuple[int, str, int, int | None, bool, str],  # op_id, request_id, first/last block, int8, transport
    "kv_migrate_out": tuple[int, str, int, bool, str],  # op_id, request_id, first block, int8, transport
    "kv_reserve": tuple[int, str, int],  # op_id, request_id, blocks
    "kv_receive": tuple[int, str, int, KVHandle],  # op_id, request_id, first block, payload
    "kv_commit": tuple[int, MigratedRequest, int, KVHandle | None],  # op_id, state, first block, payload
    "kv_abort_import": tuple[int, str],  # op_id, request_id
    "kv_discard": tuple[int, KVHandle],  # op_id, payload
    "load_lora": LoRARequest,  # answered by a PinAck
    "unload_lora": int,  # lora_int_id; answered by a PinAck
}
FromCore = CoreInfo | CoreUpdate | CoreFailure

SCHEMA = Schema("punctual.engine.core", [
    SamplingParams, StructuredOutput, LoRARequest, EngineCoreRequest, MigratedRequest, TokenLogprobs, EngineCoreOutput,
    EngineStats, SharedKV, StagedKV, CoreInfo, PinAck, KVAnswer, CoreUpdate, CoreFailure,
])
_COMMAND_ARGS = {kind: type(None) if args is None else args for kind, args in COMMANDS.items()}
for _args in _COMMAND_ARGS.values():  # compiled now: an annotation the codec cannot carry fails at import
    SCHEMA.converter(_args)


def encode_commands(commands: list[tuple]) -> bytes:
    return SCHEMA.pack(commands)


def decode_commands(data: bytes) -> list[tuple]:
    """A frame to the core: a list of [kind, args] with each kind's declared arguments."""
    raw = SCHEMA.loads(data)
    if type(raw) is not list:
        raise WireError("expected a list of commands")
    commands = []
    for index, item in enumerate(raw):
        if type(item) is not list or len(item) != 2 or type(item[0]) is not str:
            raise WireError(f"command {index}: expected [kind, arguments]")
        kind, args = item
        expected = _COMMAND_ARGS.get(kind)
        if expected is None:
            raise WireError(f"command {index}: unknown command {kind[:40]!r}")
        commands.append((kind, SCHEMA.convert(args, expected, f"{kind} command")))
    return commands


def encode_from_core(message: FromCore) -> bytes:
    return SCHEMA.pack(message)


def decode_from_core(data: bytes) -> FromCore:
    return SCHEMA.unpack(data, FromCore)


def core_channel(sock) -> BlockingChannel:
    """The core's end: sends CoreInfo/CoreUpdate/CoreFailure, reads command lists."""
    return BlockingChannel(sock, encode_from_core, decode_commands)


def front_end_channel(sock) -> BlockingChannel:
    """The front end's blocking end (while a core starts): sends commands, reads the core's messages."""
    return BlockingChannel(sock, encode_commands, decode_from_core)

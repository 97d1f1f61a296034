"""Engine configuration: one dataclass per concern, validated where the user hands it in."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 1e12, "tb": 1e12}


def parse_size(value: int | float | str | None, name: str = "memory size") -> int | None:
    """'2GiB' -> 2147483648; plain numbers are bytes. `name` is the field the error names."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{name}: cannot parse {value!r} as a size (use bytes or e.g. '2GiB', '512MiB')")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass
class ModelConfig:
    model: str = "builtin"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings (times a dynamic/yarn rope factor)
    seed: int = 0  # seed of the engine's sampler for requests that bring none
    # Weight-only quantization of every linear (CPU): none | int8 (per output channel) |
    # int4 (groups of 32 inputs). Fewer bytes per decode token; see punctual/kernels/quant.py.
    quantization: str = "none"
    # Run the plain PyTorch ops only. Otherwise bf16 on a CPU with AVX-512 BF16 runs the fused
    # kernels of punctual/kernels/csrc (a small-batch GEMM and fused RMSNorm/RoPE/SiLU), built on
    # first use. Eager is the reference the tests compare against (vLLM's flag of the same name).
    enforce_eager: bool = False
    # A request's bf16 output does not depend on its batch, its prompt's chunking or speculation:
    # every linear runs the small-batch GEMM (fixed summation order per row) and every token
    # attends alone over its unpadded context. Needs the fused kernels and a bf16 KV cache.
    batch_invariant: bool = False
    # On CUDA (unless enforce_eager), decode steps of up to this many requests replay CUDA graphs
    # captured at start-up, one per batch and context bucket (punctual/runner/decode_graphs.py). 0: none.
    cuda_graph_max_batch_size: int = 64
    # Which fused CPU paths a bf16 model takes (models/decoder.KernelChoices): fixed by
    # configuration so numerics never depend on a race at load; off to compare, as benchmarks do.
    fused_attention: bool = True  # every token attends through the fused paged-attention kernel
    decode_stack: bool = True  # decode steps of Llama-layer models run the layer stack in one kernel call
    # int4 kernels quantize activations to int8 (llama.cpp's Q8_0); so do int8 weights' big batches
    # where the kernel table sends them to the int8 GEMM (kernels/tune_table.py)
    int4_int8_activations: bool = True
    # Tensor parallelism (CPU): the model's heads, MLP columns and vocabulary split across this many
    # rank processes on this host (runner/tensor_parallel.py); one scheduler, in rank 0.
    tensor_parallel_size: int = 1
    threads_per_rank: int | None = None  # torch threads of each rank; None: this machine's cores / ranks
    # Where ranks 1..N-1 run: "local" (subprocesses of rank 0, this host) or "ray" (Ray actors, placed
    # by a placement group on the cluster this process is connected to; runner/tp_ray.py). A cluster
    # joined with --ray-address sets "ray" for its replicas.
    tensor_parallel_backend: str = "local"
    # Bytes of weights kept resident (e.g. "2GB"); None: all. Beyond it, a sliding window of layers is
    # read from the checkpoint ahead of use (TPI-LLM; checkpoints/weight_stream.py). Per rank under TP.
    max_weight_memory: int | str | None = None
    # Query-aware sparse decode attention (Quest): None (dense) | "quest". A decode at a context of
    # at least sparse_min_context tokens attends, per layer, only over the KV blocks whose key
    # min/max bound its q.k highest, at most sparse_token_budget tokens (first and last block kept).
    sparse_attention: str | None = None
    sparse_token_budget: int = 1024
    sparse_min_context: int = 2048


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | str | None = None  # bytes for the KV pool; None: a fraction of free memory
    kv_cache_memory_fraction: float = 0.1  # used when kv_cache_memory is None
    num_kv_blocks: int | None = None  # exact pool size, overrides the two above (tests, simulator)
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | int8 (quantized per token and head)
    enable_prefix_caching: bool = True  # reuse KV of shared prefixes (system prompts, documents, history)
    # Second tier for evicted prefix-cache blocks (bytes; None or 0: off): host memory on CUDA,
    # a compressed store on CPU. Blocks come back from it on a hit instead of being recomputed.
    kv_tier_memory: int | str | None = None
    kv_tier_dtype: str = "auto"  # auto (int8 on CPU, the cache's format on CUDA) | int8 | cache
    # How full blocks are identified in the prefix cache (vLLM's flag): sha256 (a crafted prompt
    # cannot reuse another's KV) | builtin (Python's 64-bit hash: faster, not collision resistant).
    prefix_caching_hash_algo: str = "sha256"


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128  # sequences in one step
    # Token budget of one step; prefill chunks fill what decodes leave (Sarathi-Serve).
    max_num_batched_tokens: int = 512
    scheduling_policy: str = "fcfs"  # fcfs | priority | slo | fair | sjf
    # SLOs for requests that bring none (ms); None: no SLO.
    default_ttft_slo_ms: float | None = None
    default_tpot_slo_ms: float | None = None
    # slo policy under overload: "reject" turns away a request that can no longer meet its TTFT;
    # "best_effort" keeps it at the lowest priority instead.
    slo_overload_action: str = "reject"
    min_prefill_chunk: int = 16  # prompts always progress at least this much per step
    max_preemptions_per_request: int = 3  # beyond this a request is preempted only as a last resort
    sjf_aging_tokens_per_s: float = 50.0  # each second waited counts as this much less work
    fair_prompt_weight: float = 1.0  # VTC service weights (output costs more, as in the VTC paper)
    fair_output_weight: float = 2.0
    fair_quantum_tokens: float = 256.0  # within this much service, prefix locality breaks ties
    # StreamingLLM (Xiao et al. 2023): a request keeps its first `attention_sinks` tokens and a
    # recent window of `streaming_window` tokens in the KV cache (whole blocks), so it may run past
    # max_model_len; None: off. attention_sinks 0 with a window is a plain sliding window.
    attention_sinks: int = 0
    streaming_window: int | None = None

    @property
    def streaming(self) -> bool:
        return self.streaming_window is not None


@dataclass
class SpeculativeConfig:
    speculative_method: str | None = None  # ngram (prompt lookup) | draft (a smaller model)
    speculative_model: str | None = None  # the draft checkpoint, for method draft
    num_speculative_tokens: int = 0  # most tokens proposed per request and step
    speculative_length: str = "fixed"  # fixed: always up to K | adaptive: by acceptance and load
    prompt_lookup_max: int = 3  # longest suffix n-gram matched by prompt lookup
    prompt_lookup_min: int = 1

    @property
    def enabled(self) -> bool:
        return self.speculative_method is not None and self.num_speculative_tokens > 0

    def validate(self) -> None:
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(f"speculative_method must be ngram or draft, got {self.speculative_method!r}")
        if self.speculative_method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method 'draft' needs speculative_model: a smaller checkpoint with the "
                             "same tokenizer (e.g. builtin-draft for builtin)")
        if self.speculative_model and self.speculative_method != "draft":
            raise ValueError("speculative_model is given but speculative_method is not 'draft'")
        if self.speculative_length not in ("fixed", "adaptive"):
            raise ValueError(f"speculative_length must be fixed|adaptive, got {self.speculative_length!r}")
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [0, 16], got {self.num_speculative_tokens}")
        if self.speculative_method is not None and self.num_speculative_tokens == 0:
            self.num_speculative_tokens = 4  # a method without a length: a common default


@dataclass
class LoRAConfig:
    """Multi-LoRA serving (Punica, S-LoRA): adapters of the base model, batched in every step."""

    enable_lora: bool = False
    max_loras: int = 1  # distinct adapters in one step (its slots); more wait in the queue
    max_lora_rank: int = 16  # adapters of a higher rank are refused
    # Adapters kept loaded in host memory (LRU); None: max_loras. Others are read from disk again.
    max_cpu_loras: int | None = None

    def validate(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # The core process checks every stateful part's invariants whenever it goes idle (tests, debugging).
    check_integrity: bool = False

    @classmethod
    def from_kwargs(cls, model: str = "builtin", **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments (the offline API and CLI flags); unknown names raise."""
        parts = {"model": {"model": model}, "cache": {}, "scheduler": {}, "speculative": {}, "lora": {}}
        owners = {f.name: "model" for f in fields(ModelConfig)}
        owners.update({f.name: "cache" for f in fields(CacheConfig)})
        owners.update({f.name: "scheduler" for f in fields(SchedulerConfig)})
        owners.update({f.name: "speculative" for f in fields(SpeculativeConfig)})
        owners.update({f.name: "lora" for f in fields(LoRAConfig)})
        check_integrity = bool(kwargs.pop("check_integrity", False))
        for name, value in kwargs.items():
            if name not in owners:
                raise TypeError(f"unknown engine argument {name!r}")
            if value is not None:
                parts[owners[name]][name] = value
        config = cls(ModelConfig(**parts["model"]), CacheConfig(**parts["cache"]),
                     SchedulerConfig(**parts["scheduler"]), SpeculativeConfig(**parts["speculative"]),
                     LoRAConfig(**parts["lora"]), check_integrity)
        config.validate()
        return config

    def validate(self) -> None:
        self.speculative.validate()
        self.lora.validate()
        if self.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.model.dtype!r}")
        if self.model.quantization not in ("none", "int8", "int4"):
            raise ValueError(f"quantization must be none|int8|int4, got {self.model.quantization!r}")
        if self.model.batch_invariant and self.model.enforce_eager:
            raise ValueError("batch_invariant runs the fused CPU kernels; it cannot be combined with enforce_eager")
        self._validate_tensor_parallel()
        if self.model.cuda_graph_max_batch_size < 0:
            raise ValueError(f"cuda_graph_max_batch_size must be >= 0, got {self.model.cuda_graph_max_batch_size}")
        if self.model.device not in ("auto", "cpu", "cuda") and not self.model.device.startswith("cuda:"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.model.device!r}")
        if self.cache.block_size < 1 or self.cache.block_size > 256:
            raise ValueError(f"block_size must be in [1, 256], got {self.cache.block_size}")
        self.model.max_weight_memory = parse_size(self.model.max_weight_memory, "max_weight_memory")
        if self.model.max_weight_memory is not None and self.model.max_weight_memory <= 0:
            raise ValueError(f"max_weight_memory must be positive, got {self.model.max_weight_memory}")
        self.cache.kv_cache_memory = parse_size(self.cache.kv_cache_memory, "kv_cache_memory")
        if self.cache.kv_cache_memory is not None and self.cache.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        self.cache.kv_tier_memory = parse_size(self.cache.kv_tier_memory, "kv_tier_memory")
        if self.cache.kv_tier_memory is not None and self.cache.kv_tier_memory < 0:
            raise ValueError("kv_tier_memory must be >= 0")
        if self.cache.prefix_caching_hash_algo not in ("sha256", "builtin"):
            raise ValueError("prefix_caching_hash_algo must be sha256|builtin, "
                             f"got {self.cache.prefix_caching_hash_algo!r}")
        if self.cache.kv_tier_dtype not in ("auto", "int8", "cache"):
            raise ValueError(f"kv_tier_dtype must be auto|int8|cache, got {self.cache.kv_tier_dtype!r}")
        if self.cache.kv_cache_dtype not in ("auto", "int8", "float32", "bfloat16", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto|int8|bfloat16|float32, got {self.cache.kv_cache_dtype!r}")
        if self.scheduler.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.scheduler.max_num_seqs}")
        if self.scheduler.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.scheduler.max_num_batched_tokens}")
        if self.scheduler.slo_overload_action not in ("reject", "best_effort"):
            raise ValueError("slo_overload_action must be reject|best_effort, "
                             f"got {self.scheduler.slo_overload_action!r}")
        if self.scheduler.attention_sinks < 0:
            raise ValueError(f"attention_sinks must be >= 0, got {self.scheduler.attention_sinks}")
        if self.scheduler.streaming_window is not None and self.scheduler.streaming_window < 1:
            raise ValueError(f"streaming_window must be >= 1, got {self.scheduler.streaming_window}")
        if self.scheduler.attention_sinks and not self.scheduler.streaming:
            raise ValueError("attention_sinks needs streaming_window (--streaming-window): the recent tokens "
                             "kept beside the sinks")
        if self.scheduler.streaming and self.speculative.enabled:
            raise ValueError("streaming_window (attention sinks) cannot be combined with speculative decoding")
        if self.model.sparse_attention not in (None, "quest"):
            raise ValueError(f"sparse_attention must be quest (or None: dense), got {self.model.sparse_attention!r}")
        if self.model.sparse_attention is not None and self.model.sparse_token_budget < 2 * self.cache.block_size:
            raise ValueError(f"sparse_token_budget must be at least two blocks ({2 * self.cache.block_size} tokens: "
                             f"the first and last are always kept), got {self.model.sparse_token_budget}")
        if self.model.sparse_attention is not None and self.scheduler.streaming:
            raise ValueError("sparse_attention cannot be combined with streaming_window (attention sinks) yet: "
                             "re-rotating a window's keys would leave its blocks' key summaries stale")
        if self.model.sparse_min_context < 1:
            raise ValueError(f"sparse_min_context must be >= 1, got {self.model.sparse_min_context}")
        if self.cache.num_kv_blocks is not None and self.cache.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.cache.num_kv_blocks}")


    def _validate_tensor_parallel(self) -> None:
        size, threads = self.model.tensor_parallel_size, self.model.threads_per_rank
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {size!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads_per_rank must be an integer >= 1, got {threads!r}")
        if self.model.tensor_parallel_backend not in ("local", "ray"):
            raise ValueError(f"tensor_parallel_backend must be local|ray, got {self.model.tensor_parallel_backend!r}")
        if size == 1:
            return
        # What a rank's shard cannot do (yet): say so at start-up rather than fail mid-step.
        refused = [why for why, on in (
            ("a CUDA device (tensor parallelism runs CPU ranks)", self.model.device.startswith("cuda")),
            ("LoRA adapters (enable_lora)", self.lora.enable_lora),
            ("a draft model (speculative_method draft)", self.speculative.speculative_method == "draft"),
            ("batch_invariant (the all-reduce changes the order of summation)", self.model.batch_invariant))
            if on]
        if refused:
            raise ValueError(f"tensor_parallel_size {size} cannot be combined with {'; '.join(refused)}")


ROUTERS = ("cache_aware", "least_loaded", "round_robin")
# How KV moves between replicas: raw buffers relayed by the front end over the replicas' sockets;
# Ray's object store; a shared-memory segment between two replicas of one host.
TRANSPORTS = ("relay", "object-store", "direct")


@dataclass
class ClusterConfig:
    """Several engine replicas behind one front end (punctual/cluster): how many, where, how routed."""

    replicas: int = 1  # engine cores; more than one runs them as Ray actors
    threads_per_replica: int = 1  # CPU threads (and Ray CPUs) each replica's torch may use
    num_gpus_per_replica: float = 0  # 1 on a GPU node: each replica its own device
    ray_address: str | None = None  # an existing cluster ("auto", "ray://..."); None: start one here
    router: str = "cache_aware"  # cache_aware | least_loaded | round_robin
    router_options: dict = field(default_factory=dict)  # the router's knobs (e.g. hot_spot_margin), for experiments
    # A local Ray's ports on loopback and no dashboard, unless the operator asks otherwise.
    ray_host: str = "127.0.0.1"
    ray_dashboard: bool = False
    max_restarts: int = 3  # Ray restarts a dead replica this many times
    start_timeout_s: float | None = None  # None: as long as the model takes to load
    # Prefill/decode disaggregation (DistServe): the first `prefill_replicas` replicas take prompts,
    # the other `decode_replicas` get each request's KV once its first token exists. 0, 0: colocated.
    prefill_replicas: int = 0
    decode_replicas: int = 0
    migration: bool = False  # rebalance by moving running requests (Llumnix)
    migration_threshold: int = 2  # ...when the busiest replica runs this many more than the idlest
    kv_transfer_int8: bool = False  # moved KV crosses the wire int8-compressed (about half the bytes; lossy)
    # How moved KV travels (TRANSPORTS): relay (through the front end's sockets), object-store (Ray's;
    # the default: 1.6-7x faster than relay from 512 tokens on one host, works across hosts, and Ray frees
    # what a crashed move leaves), direct (a shared-memory segment; between hosts: relay). BENCHMARKS.md 12.
    kv_transport: str = "object-store"

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be >= 1, got {self.threads_per_replica}")
        if self.prefill_replicas or self.decode_replicas:
            if self.prefill_replicas < 1 or self.decode_replicas < 1:
                raise ValueError("prefill_replicas and decode_replicas must both be >= 1 when either is set, "
                                 f"got {self.prefill_replicas} and {self.decode_replicas}")
            if self.replicas != self.prefill_replicas + self.decode_replicas:
                raise ValueError(f"replicas ({self.replicas}) must be prefill_replicas + decode_replicas")
        if self.migration_threshold < 2:
            raise ValueError(f"migration_threshold must be >= 2, got {self.migration_threshold}")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {', '.join(TRANSPORTS)}, got {self.kv_transport!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")

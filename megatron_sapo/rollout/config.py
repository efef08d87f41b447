"""The ``rollout.*`` settings: which engine generates, how it is laid out, how the client talks to it, how weights
are synced.

Three backends share one client and one protocol (SGLang's native HTTP API):

- ``embedded``: a CPU server process (:mod:`megatron_sapo.rollout.server`, transformers underneath) started by the
  trainer; the default, and what every CPU test runs against.
- ``sglang``: ``python -m sglang.launch_server`` processes launched with the layout below (GPU clusters).
- ``external``: servers started by someone else, reached through ``urls`` (and/or an sglang-router ``router_url``).

Names follow verl's ``rollout`` section where one exists (``n``, ``temperature``, ``top_p``, ``top_k``) and SGLang's
server arguments for the layout (``tp_size``, ``ep_size``, ``dp_size``, ``mem_fraction_static``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sapo.errors import InputError

BACKENDS = ("embedded", "sglang", "external")
WEIGHT_SYNC_MODES = ("auto", "tensor", "distributed", "disk")
DIST_BACKENDS = ("gloo", "nccl")


@dataclass
class ValidationSampling:
    """verl's ``rollout.val_kwargs``: how validation prompts are answered (default: one greedy answer each)."""

    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class RolloutConfig:
    backend: str = "embedded"  # embedded | sglang | external

    # --- sampling (the server reports log-probs of the temperature-scaled distribution; see client.py) ---
    n: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    # Responses stop after this many tokens (the stop token counts); the trainer usually passes
    # data.max_response_length to ``RolloutEngine.generate`` instead.
    max_new_tokens: int = 1024
    # Extra stop tokens; the tokenizer's eos given to RolloutEngine is always one.
    stop_token_ids: list[int] = field(default_factory=list)

    # --- where the servers are ---
    # external: SGLang server URLs (one per server, i.e. per TP group); weight updates go to each of them.
    urls: list[str] = field(default_factory=list)
    # external: generate through this sglang-router instead of round-robin over ``urls``.
    router_url: str | None = None
    # Bind address of launched servers (embedded, sglang). 0.0.0.0 when trainer and servers are on other nodes.
    host: str = "127.0.0.1"
    # First port of launched servers (server i of a node listens on port + i); 0: free ports picked on this node.
    port: int = 0

    # --- SGLang layout (backend=sglang): one server per tp_size × dp_size GPUs ---
    # embedded: the one server stands in for a TP-``tp_size`` SGLang server (each emulated TP rank loads its shard of
    # every weight from the payload of its own trainer rank, see server.py).
    tp_size: int = 1
    ep_size: int = 1  # experts split over this many of the tp_size GPUs (SGLang puts EP inside TP)
    dp_size: int = 1  # data-parallel replicas inside one server (needs weight_sync=disk)
    mem_fraction_static: float = 0.8
    num_nodes: int = 1
    gpus_per_node: int = 8
    # Node addresses for multi-node launches (index = node rank); default: this host only.
    node_hosts: list[str] = field(default_factory=list)
    # Colocated training: lets /release_memory_occupation free the GPU for the trainer between rollouts.
    enable_memory_saver: bool = False
    # SGLang honours per-request sampling seeds only with --enable-deterministic-inference (which SGLang documents as
    # 25-45% slower rollouts); without it a resumed run does not sample the same. The embedded server always does.
    deterministic_inference: bool = False
    # --enable-return-routed-experts: replies carry each token's MoE routing (actor.router_replay.mode=R3 turns it
    # on; on its own it feeds the rollout/router_agreement diagnostic).
    enable_return_routed_experts: bool = False
    extra_server_args: list[str] = field(default_factory=list)
    # Interpreter that has sglang installed (it pins its own torch, so often another venv); None: this one.
    sglang_python: str | None = None
    # SGLang's --api-key (rollout/auth.py). Launched servers get a fresh key per run when this is null; external
    # servers need the key they were started with: here, or better in $MEGATRON_SAPO_ROLLOUT_API_KEY (a key set
    # here is left out of the run's saved config, saved as null, and never logged).
    api_key: str | None = None

    # --- client ---
    concurrency: int = 256  # requests in flight over all servers
    request_timeout_s: float = 600.0  # one attempt of one request
    max_retries: int = 3  # further attempts after a failed one (connection error, timeout, 5xx)
    retry_backoff_s: float = 1.0  # doubled after every failed attempt
    startup_timeout_s: float = 900.0  # launched servers must answer /health_generate within this

    # --- weight sync ---
    # auto: tensor for servers colocated on the trainer's devices (backend embedded/sglang whose TP ranks cover the
    # trainer ranks one to one), distributed for external servers on their own GPUs (and the embedded server with
    # fewer ranks than the trainer), disk otherwise (dp_size > 1, pp_size > 1, a router without urls).
    # tensor: each trainer rank hands the server rank on its device a handle to its copy (/update_weights_from_tensor);
    # distributed: trainer rank 0 broadcasts over a process group; disk: safetensors + /update_weights_from_disk.
    weight_sync: str = "auto"
    bucket_size_mb: float = 512.0  # tensors per update request, by size
    # disk: folder the safetensors go to (must be readable by every server); None: a temporary folder.
    weight_sync_dir: str | None = None
    # distributed: gloo | nccl; None: gloo for the embedded server, nccl for SGLang.
    dist_backend: str | None = None
    # distributed: address servers reach the trainer's rank 0 at; None: 127.0.0.1 if every server is local,
    # else this host's address.
    master_addr: str | None = None
    weight_sync_timeout_s: float = 600.0

    # Over-sampling (slime's partial rollout): each generation round draws ceil(factor × prompts per round) prompts,
    # keeps the first groups to finish all ``n`` responses and aborts the rest. 1.0: off (every group is awaited).
    # Which groups are kept depends on timing, so a resumed run is exact only with it off.
    over_sample_factor: float = 1.0

    # --- embedded server ---
    embedded_max_batch_size: int = 64  # sequences decoded together

    # Sampling for data.val_files (see trainer.test_freq).
    val_kwargs: ValidationSampling = field(default_factory=ValidationSampling)

    def __post_init__(self):
        # Command-line overrides give a string where a list is meant.
        for name in ("urls", "node_hosts", "extra_server_args"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self.validate()

    def validate(self) -> None:
        """Each field's own range; cross-field rules that need the model or the world live in the engine."""
        _choice("backend", self.backend, BACKENDS)
        _choice("weight_sync", self.weight_sync, WEIGHT_SYNC_MODES)
        if self.dist_backend is not None:
            _choice("dist_backend", self.dist_backend, DIST_BACKENDS)
        _check_sampling("rollout.", self)
        _check_sampling("rollout.val_kwargs.", self.val_kwargs)
        _check(self.max_new_tokens >= 1, f"rollout.max_new_tokens={self.max_new_tokens}: must be >= 1")
        _check(isinstance(self.over_sample_factor, (int, float)) and self.over_sample_factor >= 1.0,
               f"rollout.over_sample_factor={self.over_sample_factor!r}: must be >= 1.0 (1.0: no over-sampling; "
               "1.5 draws half as many prompts again per round)")  # fmt: skip
        for name in ("tp_size", "ep_size", "dp_size", "num_nodes", "gpus_per_node", "concurrency",
                     "embedded_max_batch_size"):  # fmt: skip
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"rollout.{name}={value!r}: must be a positive integer")
        _check(0 < self.mem_fraction_static < 1, f"rollout.mem_fraction_static={self.mem_fraction_static}: must be "
               "in (0, 1), the share of GPU memory SGLang takes for weights and KV cache")  # fmt: skip
        _check(0 <= self.port < 65536, f"rollout.port={self.port}: use 0 (free ports) or a TCP port")
        _check(self.max_retries >= 0, f"rollout.max_retries={self.max_retries}: must be >= 0")
        for name in ("request_timeout_s", "startup_timeout_s", "weight_sync_timeout_s", "bucket_size_mb"):
            _check(getattr(self, name) > 0, f"rollout.{name}={getattr(self, name)}: must be > 0")
        _check(self.retry_backoff_s >= 0, f"rollout.retry_backoff_s={self.retry_backoff_s}: must be >= 0")
        named_urls = [("urls", url) for url in self.urls]
        if self.router_url:
            named_urls.append(("router_url", self.router_url))
        for name, url in named_urls:
            _check(url.startswith(("http://", "https://")),
                   f"rollout.{name}: {url!r} is not an http(s) URL; write it as http://host:port")  # fmt: skip
        if self.backend == "external":
            _check(bool(self.urls or self.router_url), "rollout.backend=external needs rollout.urls (or "
                   "rollout.router_url): list the SGLang servers to attach to")  # fmt: skip
        if self.backend == "external" and self.weight_sync == "distributed":
            _check(
                bool(self.urls),
                "rollout.weight_sync=distributed needs rollout.urls (each server joins the "
                "broadcast group); a router URL alone is not enough — list the servers, or use weight_sync=disk",
            )

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_size_mb * 2**20))


def _check_sampling(prefix: str, sampling) -> None:
    """``n``, ``temperature``, ``top_p``, ``top_k`` of the training or the validation sampling."""
    n, temperature, top_p, top_k = sampling.n, sampling.temperature, sampling.top_p, sampling.top_k
    _check(isinstance(n, int) and n >= 1, f"{prefix}n={n!r}: must be a positive integer")
    _check(temperature >= 0, f"{prefix}temperature={temperature}: must be >= 0 (0: greedy)")
    _check(0 < top_p <= 1, f"{prefix}top_p={top_p}: must be in (0, 1]")
    _check(top_k == -1 or top_k >= 1, f"{prefix}top_k={top_k}: use -1 (off) or a positive integer")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _choice(name: str, value, choices) -> None:
    _check(value in choices, f"rollout.{name}={value!r}: use one of {', '.join(choices)}")

"""The rollout engine the trainer holds: servers up, prompts in, samples out, new weights in.

    with RolloutEngine(config.rollout, model_path=hf_dir, eos_token_id=tokenizer.eos_token_id) as engine:
        groups = engine.generate(prompt_ids, n=8, seed=step)   # groups[i][j]: sample j of prompt i
        engine.update_weights(actor.export_hf_weights())       # (hf_name, tensor) pairs, on trainer rank 0
        # weight_sync=tensor is collective: the other ranks call push_colocated(their copies, bucket_bytes) meanwhile

Backends (``rollout.backend``): ``embedded`` starts :mod:`megatron_sapo.rollout.server` on this host; ``sglang``
launches SGLang for the configured layout (:mod:`megatron_sapo.rollout.sglang`); ``external`` attaches to the
servers at ``rollout.urls`` / ``rollout.router_url``. All three are driven through the same
:class:`~megatron_sapo.rollout.client.RolloutClient`, on an event loop of its own, so the trainer stays synchronous.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from megatron_sapo.errors import InputError
from megatron_sapo.rollout.auth import API_KEY_ENV, run_api_key
from megatron_sapo.rollout.client import EventLoopThread, RolloutClient, RolloutError, RolloutSample, SamplingParams
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.process import ServerProcess, http_status, server_env, wait_until_serving
from megatron_sapo.rollout.sglang import launch_node, plan_servers, server_urls
from megatron_sapo.rollout.weight_sync import (
    DiskWeightSync,
    DistributedWeightSync,
    TensorWeightSync,
    WeightSyncStats,
    default_master_address,
    free_port,
    launched_ranks_per_server,
    push_colocated,
    resolve_weight_sync,
)

logger = logging.getLogger(__name__)


class RolloutEngine:
    """Rollout servers for the trainer's rank 0; a context manager that shuts them down on exit.

    ``log_dir``: where launched servers write their output (default: a temporary folder, removed at a clean
    shutdown and kept when the servers failed to start, since the error points there). ``trainer_ranks``: the
    trainer's processes (default: torch.distributed's world size, 1 without it), which the weight-sync mode is
    chosen against (:func:`~megatron_sapo.rollout.weight_sync.resolve_weight_sync`): ``weight_sync_mode``.
    """

    def __init__(self, config: RolloutConfig, *, model_path: str, eos_token_id: int | None = None,
                 log_dir: str | None = None, trainer_ranks: int | None = None,
                 api_key: str | None = None):  # fmt: skip
        config.validate()
        self.config = config
        # rollout/auth.py: the servers answer only requests with this key (launched ones get a new one per run).
        self.api_key = api_key or run_api_key(config.api_key, launched=config.backend != "external")
        if trainer_ranks is None:
            import torch.distributed as dist

            trainer_ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.trainer_ranks = trainer_ranks
        self.weight_sync_mode: str | None = None
        self.model_path = model_path
        self.eos_token_id = eos_token_id
        self.processes: list[ServerProcess] = []
        self._own_dirs: list[str] = []
        self._weight_version = 0
        self._sync: DiskWeightSync | DistributedWeightSync | TensorWeightSync | None = None
        self._server_devices: set[str] = set()
        self._loop = EventLoopThread()
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="rollout-logs-")
        self._own_log_dir = log_dir is None
        try:
            self.urls, router_url, self.ranks_per_server = self._start_or_attach()
            self.client = RolloutClient(
                self.urls, router_url=router_url, concurrency=config.concurrency,
                request_timeout_s=config.request_timeout_s, max_retries=config.max_retries,
                retry_backoff_s=config.retry_backoff_s, api_key=self.api_key,
            )  # fmt: skip
            self.client.exit_reason = self.exit_reason
        except BaseException:
            self.shutdown(keep_logs=bool(self.processes))  # a server's log explains its failure
            raise

    # --- servers ------------------------------------------------------------------------------------------------

    def _start_or_attach(self) -> tuple[list[str], str | None, list[int]]:
        config = self.config
        if config.backend in ("embedded", "sglang"):
            if not os.path.isfile(os.path.join(self.model_path, "config.json")):
                raise InputError(f"model.path={self.model_path}: no config.json there; the rollout servers load an HF "
                                 "checkpoint folder")  # fmt: skip
        if config.backend == "embedded":
            self._resolve_weight_sync(launched_ranks_per_server(config))
            port = config.port or free_port()
            url = f"http://{_reachable(config.host)}:{port}"
            argv = [sys.executable, "-m", "megatron_sapo.rollout.server", "--model-path", self.model_path,
                    "--host", config.host, "--port", str(port), "--max-batch-size", str(config.embedded_max_batch_size),
                    "--dist-timeout-s", str(config.weight_sync_timeout_s), "--tp-size", str(config.tp_size),
                    "--log-level", "warning"]  # fmt: skip
            if config.enable_return_routed_experts:
                argv.append("--enable-return-routed-experts")
            env = server_env(OMP_NUM_THREADS="1", **{API_KEY_ENV: self.api_key})
            self.processes.append(ServerProcess(argv, url=url, log_path=os.path.join(self.log_dir, "embedded.log"),
                                                env=env).start())  # fmt: skip
            wait_until_serving(self.processes, config.startup_timeout_s)
            return [url], None, [config.tp_size]
        if config.backend == "sglang":
            launches = plan_servers(config, self.model_path)  # validates the layout before anything starts
            self._resolve_weight_sync(launched_ranks_per_server(config))
            if not config.deterministic_inference:
                logger.warning("rollout.deterministic_inference=false: SGLang ignores the per-request sampling seeds, "
                               "so a resumed run does not sample the same")  # fmt: skip
            ports = None
            if config.port == 0:
                ports = [free_port() for _ in range(max(1, config.gpus_per_node // (config.tp_size * config.dp_size)))]
                launches = plan_servers(config, self.model_path, ports=ports)
            self.processes += launch_node(config, self.model_path, node_rank=0, log_dir=self.log_dir, ports=ports,
                                          api_key=self.api_key)  # fmt: skip
            urls = server_urls(launches)
            if config.num_nodes > 1:
                logger.info("waiting for SGLang processes on nodes 1..%d (started by megatron_sapo.rollout.sglang"
                            ".launch_node on each node)", config.num_nodes - 1)  # fmt: skip
            remote = [ServerProcess([], url=u, log_path="(on another node)") for u in urls
                      if u not in {p.url for p in self.processes}]  # fmt: skip
            wait_until_serving([*self.processes, *remote], config.startup_timeout_s)
            return urls, None, [config.tp_size] * len(urls)
        # external
        targets = [("rollout.urls", u) for u in config.urls]
        if config.router_url:
            targets.append(("rollout.router_url", config.router_url))
        for field_name, url in targets:
            status = http_status(url.rstrip("/") + "/health", timeout_s=10)
            if not isinstance(status, int):
                raise InputError(f"{field_name}: {url} is not reachable ({status}); start the server or fix the URL")
        infos = [self._server_info(url) for url in config.urls] if config.weight_sync != "disk" else []
        # SGLang's rank in an update group, and the payload it reads, is its TP rank: a server brings tp_size ranks.
        ranks = [int(info.get("tp_size") or 1) for info in infos] or [1] * len(config.urls)
        self._server_devices = {str(info.get("device") or "cuda") for info in infos}
        self._resolve_weight_sync(ranks, infos or None)
        if infos and not all(info.get("enable_deterministic_inference") for info in infos):
            logger.warning("a rollout server runs without --enable-deterministic-inference: it ignores the sampling "
                           "seeds, so a resumed run does not sample the same")  # fmt: skip
        return [u.rstrip("/") for u in config.urls], config.router_url, ranks

    def exit_reason(self, url: str | None = None) -> str | None:
        """Why a server this engine started is gone, or None (any of them: a multi-server layout is broken without
        it, so ``url`` does not narrow the check)."""
        for server in self.processes:
            if server.process is not None and not server.alive:
                name = server.url or " ".join(server.argv[:4])
                code = server.process.returncode
                how = f"exited with code {code}"
                if code < 0:
                    how = f"was killed by {signal.Signals(-code).name} (exit code {code})"
                return f"rollout server {name} (pid {server.process.pid}) {how}; its log is {server.log_path}"
        return None

    def _server_info(self, url: str) -> dict:
        probe = RolloutClient([url], max_retries=1, request_timeout_s=30, retry_backoff_s=0.5, api_key=self.api_key)
        try:
            return self._loop.run(probe.server_info(url))
        finally:
            self._loop.run(probe.close())

    def _resolve_weight_sync(self, ranks_per_server: list[int], servers: list[dict] | None = None) -> None:
        self.weight_sync_mode = resolve_weight_sync(self.config, trainer_ranks=self.trainer_ranks,
                                                    ranks_per_server=ranks_per_server, servers=servers)  # fmt: skip
        logger.info("rollout weight sync: %s (rollout.weight_sync=%s, %d trainer rank(s), server TP ranks %s)",
                    self.weight_sync_mode, self.config.weight_sync, self.trainer_ranks, ranks_per_server)  # fmt: skip

    def _temp_dir(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix)
        self._own_dirs.append(path)
        return path

    # --- generation -------------------------------------------------------------------------------------------------

    def sampling_params(self, **overrides) -> SamplingParams:
        """The configured sampling, with the tokenizer's eos among the stop tokens."""
        config = self.config
        stops = list(config.stop_token_ids) + ([self.eos_token_id] if self.eos_token_id is not None else [])
        params = SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                max_new_tokens=config.max_new_tokens, stop_token_ids=tuple(stops),
                                return_routed_experts=config.enable_return_routed_experts)  # fmt: skip
        return replace(params, **overrides)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int | None = None, *, seed: int | None = None,
                 sampling: SamplingParams | None = None,
                 max_new_tokens: int | None = None) -> list[list[RolloutSample]]:  # fmt: skip
        """``n`` (default ``rollout.n``) samples per prompt: ``result[i][j]`` is sample ``j`` of prompt ``i``.

        With a ``seed`` the samples are reproducible: sample ``j`` of prompt ``i`` draws from its own seed, derived
        from (seed, i, j), whatever else is generated alongside.
        """
        params = sampling or self.sampling_params()
        if max_new_tokens is not None:
            params = replace(params, max_new_tokens=max_new_tokens)
        count = self.config.n if n is None else n
        return self._loop.run(self.client.generate_groups([list(p) for p in prompt_token_ids], count, params, seed))

    def generate_first(self, prompt_token_ids: Sequence[Sequence[int]], keep: int, n: int | None = None, *,
                       seed: int | None = None,
                       max_new_tokens: int | None = None) -> tuple[list[int], list[list[RolloutSample]]]:  # fmt: skip
        """Over-sampling: the first ``keep`` prompts whose ``n`` samples all finish, as ``(prompt indices, groups)``
        in completion order; the other requests are aborted (``RolloutClient.generate_first_groups``)."""
        params = self.sampling_params()
        if max_new_tokens is not None:
            params = replace(params, max_new_tokens=max_new_tokens)
        count = self.config.n if n is None else n
        prompts = [list(p) for p in prompt_token_ids]
        return self._loop.run(self.client.generate_first_groups(prompts, count, params, keep, seed))

    # --- weights ----------------------------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       weight_version: str | None = None) -> WeightSyncStats:  # fmt: skip
        """Send the trainer's full HF-named weights to every server (consumes the iterable in order, lazily).

        ``weight_sync_mode`` tensor is collective: every trainer rank iterates the same tensors (on its own device),
        the others through ``push_colocated(named_tensors, bucket_bytes)``; all ranks raise together on a failure.
        Otherwise this runs on rank 0 alone, and if the sync fails, the rest of ``named_tensors`` is still drained
        before the error is raised: producing it is collective on the trainer, and the other ranks must not be left
        waiting in a gather.
        """
        self._weight_version += 1
        version = weight_version or str(self._weight_version)
        tensors = iter(named_tensors)
        if self.weight_sync_mode == "tensor":
            stats = push_colocated(tensors, self.config.bucket_bytes, sender=self._weight_sync(),
                                   weight_version=version)  # fmt: skip
        else:
            try:
                stats = self._weight_sync().push(tensors, self.config.bucket_bytes, weight_version=version)
            except Exception:
                for _ in tensors:
                    pass
                raise
        logger.debug("weights v%s synced (%s): %d tensors, %d buckets, %.1f MB in %.2fs", version,
                     self.weight_sync_mode, stats.tensors, stats.buckets, stats.bytes / 2**20,
                     stats.seconds)  # fmt: skip
        return stats

    def _weight_sync(self):
        if self._sync is not None:
            return self._sync
        config = self.config
        if self.weight_sync_mode == "tensor":
            self._sync = TensorWeightSync(self.client, self._loop, self.urls, self.ranks_per_server,
                                          timeout_s=config.weight_sync_timeout_s)  # fmt: skip
        elif self.weight_sync_mode == "disk":
            folder = config.weight_sync_dir or os.path.join(self._temp_dir("rollout-weights-"), "hf")
            self._sync = DiskWeightSync(self.client, self._loop, self.urls, folder, side_files_from=self.model_path,
                                        timeout_s=config.weight_sync_timeout_s)  # fmt: skip
        else:
            # gloo for servers on CPU (the embedded one), nccl for SGLang on GPUs.
            on_cpu = config.backend == "embedded" or self._server_devices == {"cpu"}
            backend = config.dist_backend or ("gloo" if on_cpu else "nccl")
            if backend == "nccl" and not torch.cuda.is_available():
                raise InputError("rollout.dist_backend=nccl needs CUDA on the trainer; use gloo, or weight_sync=disk")
            self._sync = DistributedWeightSync(
                self.client, self._loop, self.urls, self.ranks_per_server, backend=backend,
                master_address=config.master_addr or default_master_address(self.urls),
                timeout_s=config.weight_sync_timeout_s,
            )  # fmt: skip
        return self._sync

    # --- cache and memory ---------------------------------------------------------------------------------------------

    def flush_cache(self) -> None:
        self._on_every_server(self.client.flush_cache)

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Colocated training: the servers give their GPU memory back (SGLang needs ``enable_memory_saver``).
        Tags: ``kv_cache``, ``weights``, ``cuda_graph``; none = all three (for release and resume alike)."""
        self._on_every_server(lambda url: self.client.release_memory_occupation(url, tags))

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._on_every_server(lambda url: self.client.resume_memory_occupation(url, tags))

    def _on_every_server(self, call) -> None:
        import asyncio

        async def every():
            await asyncio.gather(*(call(url) for url in self.urls))

        self._loop.run(every())

    # --- lifetime -------------------------------------------------------------------------------------------------

    def shutdown(self, keep_logs: bool = False) -> None:
        """Leave the weight-update group, stop the servers this engine started, remove its temporary folders."""
        if self._sync is not None and isinstance(self._sync, DistributedWeightSync):
            self._sync.close(notify=not self.processes)  # servers about to be stopped need no goodbye
        self._sync = None
        client = getattr(self, "client", None)
        if client is not None and not self._loop.loop.is_closed():
            try:
                self._loop.run(client.close(), timeout=10)
            except Exception as error:
                logger.warning("closing the rollout client: %s", error)
        self._loop.close()
        for process in self.processes:
            process.stop()
        self.processes = []
        for path in self._own_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._own_dirs = []
        if self._own_log_dir and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


__all__ = ["RolloutEngine", "RolloutError", "RolloutSample", "SamplingParams"]

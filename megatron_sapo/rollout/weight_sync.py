"""Sending the trainer's weights to the rollout servers, in buckets of bounded size.

All modes take ``(hf_name, tensor)`` pairs in checkpoint order, lazily, bucket by bucket
(``rollout.weight_sync``; :func:`resolve_weight_sync` picks one from the layout):

- ``tensor`` (colocated, :func:`push_colocated`): every trainer rank holds every full tensor of the bucket on its
  own device and hands the server rank on that device a handle to it: ``MultiprocessingSerializer`` semantics
  (torch's multiprocessing reductions under ``ForkingPickler``, base64): a CUDA IPC handle on GPU, a shared-memory
  file name (torch's ``file_system`` strategy) on CPU. Global rank 0 gathers the handles and posts each server its
  TP ranks' payloads (``/update_weights_from_tensor``, ``serialized_named_tensors[tp_rank]``); the buffers live
  until every server has loaded them. Trainer rank ``r`` faces server rank ``r`` (servers in URL order, TP ranks in
  order), which is the GPU layout the launcher gives (:mod:`megatron_sapo.rollout.sglang`). This is how slime and
  verl update colocated engines; a broadcast group would put two NCCL ranks on one GPU, which NCCL refuses.
- ``distributed`` (:class:`DistributedWeightSync`): the trainer's rank 0 and every server rank form one process
  group, rank 0 being the trainer (``/init_weights_update_group``, answered while this side joins the rendezvous).
  Per bucket, the names, dtypes and shapes go to ``/update_weights_from_distributed`` while rank 0 broadcasts the
  tensors in that order; each server receives them into fresh buffers and loads them by name.
- ``disk`` (:class:`DiskWeightSync`): each bucket becomes one safetensors file of an HF-style folder (with its
  ``model.safetensors.index.json``); then every server reloads from it (``/update_weights_from_disk``). The folder
  must be visible to every server.

SGLang 0.5.23 loads tensors and broadcasts only inside a weight-update session (``/begin_weight_update`` …
``/end_weight_update``, ``scheduler_components/weight_updater.py``): one is opened on every server before the first
bucket and closed after the last, also when the update fails.

The group is built the way SGLang builds its side (``init_custom_process_group`` in
``python/sglang/srt/utils/common.py``: a TCP store hosted by the trainer, a ``PrefixStore`` named after the group,
torch's process-group constructor with no global ranks), so the two sides agree on the store keys, and it stays
apart from torchrun's default group: its own store, its own name, never the default. A failed sync leaves no half
group behind: the servers are told to drop theirs, and the next sync forms a new one.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import logging
import os
import pickle
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_sapo.errors import InputError
from megatron_sapo.rollout.client import EventLoopThread, RolloutClient, RolloutError, RolloutServerDown

logger = logging.getLogger(__name__)

GROUP_NAME = "weight_update_group"  # SGLang's default group_name
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "vocab.json", "merges.txt")  # fmt: skip


@dataclass
class WeightSyncStats:
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0


NamedTensors = Iterable[tuple[str, torch.Tensor]]


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of tensors of at most ``bucket_bytes`` together; a larger tensor is a bucket of its own."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def launched_ranks_per_server(config) -> list[int]:
    """TP ranks of each server the trainer launches itself (backend embedded or sglang), in URL order."""
    if config.backend == "embedded":
        return [config.tp_size]
    gpus, per_node = config.tp_size * config.dp_size, config.gpus_per_node  # as sglang.plan_servers lays them out
    servers = per_node // gpus * config.num_nodes if gpus <= per_node else config.num_nodes // -(-gpus // per_node)
    return [config.tp_size] * servers


def resolve_weight_sync(config, *, trainer_ranks: int, ranks_per_server: list[int],
                        servers: list[dict] | None = None) -> str:  # fmt: skip
    """The weight-sync mode for ``config`` (a RolloutConfig) and this layout, or one InputError line saying why the
    configured mode cannot work. ``servers``: each server's layout (``dp_size``, ``pp_size``; /server_info for
    external servers), default the configured one."""
    mode, backend = config.weight_sync, config.backend
    servers = servers or [{"dp_size": config.dp_size, "pp_size": 1}] * len(ranks_per_server)
    replicas = max((int(info.get("dp_size") or 1) for info in servers), default=1)
    stages = max((int(info.get("pp_size") or 1) for info in servers), default=1)
    server_ranks = sum(ranks_per_server)
    colocated = backend != "external" and server_ranks == trainer_ranks
    if mode == "auto":
        if replicas > 1 or stages > 1:
            return "disk"
        if colocated:
            return "tensor"
        if (backend == "external" and config.urls) or (backend == "embedded" and ranks_per_server == [1]):
            return "distributed"
        return "disk"
    if mode in ("tensor", "distributed") and replicas > 1:
        raise InputError(f"rollout.weight_sync={mode}: a server runs dp_size={replicas} data-parallel replicas, and "
                         "SGLang 0.5.23 loads tensors and broadcasts only with dp_size=1 (attention DP, attn_dp_size, "
                         "is fine); use weight_sync=disk, or more servers with dp_size=1")  # fmt: skip
    if mode in ("tensor", "distributed") and stages > 1:
        raise InputError(f"rollout.weight_sync={mode}: a server runs pp_size={stages}, and SGLang numbers the update "
                         "ranks by TP rank only, so its pipeline stages would claim the same ranks; use "
                         "weight_sync=disk")  # fmt: skip
    if mode == "tensor" and server_ranks != trainer_ranks:
        raise InputError(f"rollout.weight_sync=tensor hands trainer rank r's tensors to server rank r on its device, "
                         f"but {trainer_ranks} trainer rank(s) face {server_ranks} server rank(s) "
                         f"({len(ranks_per_server)} server(s) × their TP size); lay the servers over exactly the "
                         "trainer's GPUs, or use weight_sync=distributed or disk")  # fmt: skip
    if mode == "distributed" and backend == "embedded" and ranks_per_server != [1]:
        raise InputError(f"rollout.weight_sync=distributed: the embedded server joins the update group as one rank, "
                         f"so it needs rollout.tp_size=1 (got {ranks_per_server[0]}); use tensor or disk")  # fmt: skip
    if mode == "distributed" and backend == "sglang" and (config.dist_backend or "nccl") == "nccl":
        raise InputError("rollout.weight_sync=distributed with rollout.backend=sglang: the launched servers share the "
                         "trainer's GPUs (server 0's TP rank 0 and trainer rank 0 are both on GPU 0), and NCCL "
                         "refuses two ranks of one communicator on one GPU; use weight_sync=tensor (auto picks it "
                         "for colocated layouts) or disk")  # fmt: skip
    return mode


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's spelling: ``getattr(torch, name)`` on the receiving side."""
    return str(dtype).removeprefix("torch.")


def init_custom_process_group(*, backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                              group_name: str = GROUP_NAME, timeout_s: float = 600.0):  # fmt: skip
    """A process group over its own TCP store, independent of (and allowed alongside) the default group.

    Rank 0 hosts the store and blocks until all ``world_size`` ranks have joined. Every rank must use the same
    ``group_name``: it prefixes the store keys.

    The store is a plain ``TCPStore``, what SGLang's ``rendezvous("tcp://...")`` makes outside torchrun. Not
    ``rendezvous`` itself: under torchrun (``TORCHELASTIC_USE_AGENT_STORE``) it would treat rank 0 as a client of
    torchrun's agent store and prefix the keys, and the servers would never find the trainer.
    """
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout,
                     multi_tenant=True)  # fmt: skip
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    # Group rank i is "global" rank i for torch.distributed's collectives on this group.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_custom_process_group(group) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(group)
    except Exception as error:  # a dead peer must not stop the caller from moving on
        logger.warning("destroying the weight-update group failed: %s", error)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_master_address(urls: Iterable[str]) -> str:
    """127.0.0.1 when every server is on this host, else an address of this host the servers can reach."""
    from urllib.parse import urlparse

    hosts = {urlparse(u).hostname for u in urls}
    if hosts <= {"127.0.0.1", "localhost", "::1"}:
        return "127.0.0.1"
    # The address this host would use to reach the first server is one that server can reach back.
    target = next(h for h in hosts if h not in {"127.0.0.1", "localhost", "::1"})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))  # UDP: no packet is sent
        return s.getsockname()[0]


class DiskWeightSync:
    """Bucket → one safetensors file; the whole folder → ``/update_weights_from_disk`` on every server."""

    def __init__(self, client: RolloutClient, loop: EventLoopThread, urls: list[str], folder: str, *,
                 side_files_from: str | None = None, timeout_s: float = 600.0):  # fmt: skip
        self.client, self.loop, self.urls, self.folder, self.timeout_s = client, loop, urls, folder, timeout_s
        self.side_files_from = side_files_from

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
             weight_version: str | None = None) -> WeightSyncStats:  # fmt: skip
        from safetensors.torch import save_file

        start, stats = time.perf_counter(), WeightSyncStats()
        tmp = self.folder.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weight_map, files = {}, []
        for index, bucket in enumerate(iter_buckets(named_tensors, bucket_bytes)):
            filename = f"model-{index + 1:05d}.safetensors"
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
            save_file(tensors, os.path.join(tmp, filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, filename))
            files.append(filename)
            stats.buckets += 1
            stats.tensors += len(tensors)
            stats.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        # HF's sharded-checkpoint names, so that the folder is a checkpoint any loader understands.
        total = len(files)
        renamed = {f: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, f in enumerate(files)}
        for old, new in renamed.items():
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": stats.bytes},
                       "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, f, indent=1)  # fmt: skip
        # The small files beside the weights make the folder a checkpoint a fresh server can start from.
        for name in SIDE_FILES:
            source = os.path.join(self.side_files_from or "", name)
            if self.side_files_from and os.path.isfile(source):
                shutil.copy(source, os.path.join(tmp, name))
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(tmp, self.folder)

        async def reload_all():
            await _gather_or_raise([
                self.client.update_weights_from_disk(url, self.folder, weight_version=weight_version,
                                                     timeout_s=self.timeout_s)
                for url in self.urls
            ])  # fmt: skip

        self.loop.run(reload_all())
        stats.seconds = time.perf_counter() - start
        return stats


class DistributedWeightSync:
    """A broadcast group between the trainer's rank 0 (rank 0 of the group) and every rank of every server."""

    def __init__(self, client: RolloutClient, loop: EventLoopThread, urls: list[str], ranks_per_server: list[int], *,
                 backend: str, master_address: str = "127.0.0.1", timeout_s: float = 600.0,
                 group_name: str = GROUP_NAME):  # fmt: skip
        if len(urls) != len(ranks_per_server):
            raise ValueError("one rank count per server URL")
        self.client, self.loop, self.urls = client, loop, urls
        self.ranks_per_server = ranks_per_server
        self.backend, self.master_address = backend, master_address
        self.timeout_s, self.group_name = timeout_s, group_name
        self.group = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def connect(self) -> None:
        """Form the group: ask every server to join while this process hosts the rendezvous as rank 0."""
        if self.group is not None:
            return
        world_size = 1 + sum(self.ranks_per_server)
        port = free_port(self.master_address if self.master_address != "0.0.0.0" else "")
        offsets = [1 + sum(self.ranks_per_server[:i]) for i in range(len(self.urls))]

        async def join_all():
            await _gather_or_raise([
                self.client.init_weights_update_group(
                    url, master_address=self.master_address, master_port=port, rank_offset=offset,
                    world_size=world_size, group_name=self.group_name, backend=self.backend, timeout_s=self.timeout_s,
                )
                for url, offset in zip(self.urls, offsets, strict=True)
            ])  # fmt: skip

        joined = self.loop.submit(join_all())
        # This side's rendezvous blocks until every server rank has joined; watch the servers' replies meanwhile,
        # so that a server that refuses to join fails the sync now rather than at the rendezvous timeout.
        built: dict = {}

        def build():
            try:
                built["group"] = init_custom_process_group(
                    backend=self.backend, master_address=self.master_address, master_port=port,
                    world_size=world_size, rank=0, group_name=self.group_name, timeout_s=self.timeout_s,
                )  # fmt: skip
            except Exception as error:
                built["error"] = error

        builder = threading.Thread(target=build, name="weight-update-rendezvous", daemon=True)
        builder.start()
        deadline = time.monotonic() + self.timeout_s
        while builder.is_alive():
            builder.join(0.05)
            reason = _failure(joined)
            if reason is None and time.monotonic() > deadline:
                reason = f"no rendezvous within {self.timeout_s:g}s"
            if reason is not None and builder.is_alive():
                raise RolloutError(f"the weight-update group did not form ({world_size} ranks at "
                                   f"{self.master_address}:{port}): {reason}")  # fmt: skip
        if "error" in built:
            joined.cancel()
            reason = _failure(joined) or f"{type(built['error']).__name__}: {built['error']}"
            raise RolloutError(f"the weight-update group did not form ({world_size} ranks at "
                               f"{self.master_address}:{port}): {reason}") from built["error"]  # fmt: skip
        self.group = built["group"]
        try:
            _result(joined, self.timeout_s, "joining the weight-update group")
        except RolloutError:
            self.close()
            raise
        logger.info("weight-update group formed: trainer + %d server ranks", world_size - 1)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
             weight_version: str | None = None) -> WeightSyncStats:  # fmt: skip
        self.connect()
        with weight_update_session(self.client, self.loop, self.urls, self.timeout_s):
            return self._push(named_tensors, bucket_bytes, weight_version)

    def _push(self, named_tensors, bucket_bytes: int, weight_version: str | None) -> WeightSyncStats:
        start, stats = time.perf_counter(), WeightSyncStats()
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
            names = [name for name, _ in bucket]

            async def announce(names=names, tensors=tensors):
                await _gather_or_raise([
                    self.client.update_weights_from_distributed(
                        url, names=names, dtypes=[dtype_name(t.dtype) for t in tensors],
                        shapes=[list(t.shape) for t in tensors], group_name=self.group_name,
                        weight_version=weight_version, timeout_s=self.timeout_s,
                    )
                    for url in self.urls
                ])  # fmt: skip

            announced = self.loop.submit(announce())
            try:
                for tensor in tensors:
                    self.group.broadcast(tensor, 0).wait()
            except Exception as error:
                # A server that died mid-broadcast shows here as the transport's error (gloo: "Connection reset by
                # peer"); its announce request, failing meanwhile, names the server, so wait a moment for it.
                concurrent.futures.wait([announced], timeout=ANNOUNCE_GRACE_S)
                reason = _failure(announced) or f"{type(error).__name__}: {_first_line(error)}"
                self.close(notify=not _server_down(announced))  # a dead server takes no goodbye
                raise RolloutError(f"broadcasting weights to the rollout servers failed: {reason}") from error
            try:
                _result(announced, self.timeout_s, "loading a weight bucket")
            except RolloutError:
                self.close()  # a server that failed mid-bucket leaves the group unusable; the next push re-forms it
                raise
            stats.buckets += 1
            stats.tensors += len(tensors)
            stats.bytes += sum(t.numel() * t.element_size() for t in tensors)
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self, notify: bool = True) -> None:
        if self.group is None:
            return
        if notify:
            try:
                self.loop.run(_gather_or_raise([self.client.destroy_weights_update_group(url, self.group_name)
                                                for url in self.urls]), timeout=30)  # fmt: skip
            except Exception as error:
                logger.warning("servers did not leave the weight-update group: %s", error)
        destroy_custom_process_group(self.group)
        self.group = None


@contextmanager
def weight_update_session(client: RolloutClient, loop: EventLoopThread, urls: list[str], timeout_s: float):
    """``/begin_weight_update`` on every server, ``/end_weight_update`` on every server afterwards, also when the
    body (or a begin) fails; then the body's error is the one raised."""
    try:
        loop.run(_gather_or_raise([client.begin_weight_update(url, timeout_s=timeout_s) for url in urls]))
    except BaseException:
        _end_sessions(client, loop, urls, timeout_s, quiet=True)  # those that did open one
        raise
    try:
        yield
    except BaseException:
        _end_sessions(client, loop, urls, timeout_s, quiet=True)
        raise
    _end_sessions(client, loop, urls, timeout_s)


def _end_sessions(client, loop, urls, timeout_s: float, quiet: bool = False) -> None:
    import asyncio

    async def end_all():
        calls = (client.end_weight_update(url, timeout_s=timeout_s) for url in urls)
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        errors = [r for r in loop.run(end_all()) if isinstance(r, BaseException)]
    except Exception as error:  # the loop itself failed
        errors = [error]
    if errors and not quiet:
        raise errors[0] if isinstance(errors[0], RolloutError) else RolloutError(str(errors[0]))
    for error in errors:
        if not isinstance(error, RolloutServerDown):  # a dead server is what the raised error says already
            logger.warning("closing a weight-update session after a failed update: %s", error)


# --- tensor handles (colocated) -------------------------------------------------------------------------------------

BUCKET_ALIGN = 64  # bytes: every tensor of a packed bucket starts at a multiple, so any dtype can view it


def pack_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The bucket copied into one byte buffer on its device (one storage: one handle per bucket, as SGLang's
    flattened buckets have); returns the buffer and ``(name, view)`` pairs, each view shaped like its tensor."""
    starts, total = [], 0
    for _, tensor in bucket:
        starts.append(total)
        total += -(-tensor.numel() * tensor.element_size() // BUCKET_ALIGN) * BUCKET_ALIGN
    flat = torch.empty(max(total, 1), dtype=torch.uint8, device=bucket[0][1].device)
    views = []
    for (name, tensor), start in zip(bucket, starts, strict=True):
        size = tensor.numel() * tensor.element_size()
        view = flat[start : start + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        views.append((name, view))
    return flat, views


@contextmanager
def ipc_shareable_allocations():
    """CUDA buffers allocated inside are in ordinary segments even when the trainer runs with
    ``expandable_segments:True`` (train.sh): torch shares an expandable segment through ``pidfd_getfd``, which a
    process that is not a descendant of the producer may be refused (SGLang's TP processes are not children of
    trainer ranks > 0), while ordinary segments go through CUDA IPC handles. verl switches the setting off around its
    SGLang weight updates the same way. No-op on CPU and without the setting."""
    settings = ",".join(os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    expandable = "expandable_segments:true" in settings.replace(" ", "").lower()
    if not (expandable and torch.cuda.is_available()):
        yield
        return
    torch.cuda.empty_cache()  # unmaps the free expandable pages, so new buffers come from fresh segments
    torch._C._accelerator_setAllocatorSettings("expandable_segments:False")
    try:
        yield
    finally:
        torch._C._accelerator_setAllocatorSettings("expandable_segments:True")


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``: ``ForkingPickler`` with torch's
    multiprocessing reductions (a CUDA tensor becomes an IPC handle), base64. CPU tensors go through torch's
    ``file_system`` sharing strategy: a named shared-memory file any process can open (the default strategy passes
    file descriptors, which only a child of this process could receive)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as torch_mp  # registers torch's reductions with ForkingPickler

    buffer = io.BytesIO()
    strategy = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        ForkingPickler(buffer).dump(list(named_tensors))
    finally:
        torch_mp.set_sharing_strategy(strategy)
    return base64.b64encode(buffer.getvalue()).decode()


class _TensorUnpickler(pickle.Unpickler):
    """Only what torch's tensor reductions need (as SGLang's ``SafeUnpickler``): a payload is untrusted input."""

    ALLOWED = {
        ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "str"), ("builtins", "int"),
        ("builtins", "bool"), ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
        ("torch", "Tensor"),
        ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
        ("torch._utils", "_rebuild_tensor_v2"), ("torch.multiprocessing.reductions", "rebuild_tensor"),
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
        ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
        ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a tensor payload")


def deserialize_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """The receiving side of :func:`serialize_named_tensors` (SGLang's ``MultiprocessingSerializer.deserialize``)."""
    data = base64.b64decode(payload, validate=True)
    named = _TensorUnpickler(io.BytesIO(data)).load()
    if not isinstance(named, list) or not all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)
        for item in named
    ):
        raise ValueError("a tensor payload must be a list of (name, tensor) pairs")
    return named


class TensorWeightSync:
    """Global rank 0's side of :func:`push_colocated`: the servers' sessions and their ``/update_weights_from_tensor``
    calls, each server getting the payloads of its TP ranks (trainer ranks ``offset .. offset + tp_size``)."""

    def __init__(self, client: RolloutClient, loop: EventLoopThread, urls: list[str], ranks_per_server: list[int], *,
                 timeout_s: float = 600.0):  # fmt: skip
        self.client, self.loop, self.urls, self.timeout_s = client, loop, urls, timeout_s
        self.slices = [(sum(ranks_per_server[:i]), n) for i, n in enumerate(ranks_per_server)]
        self.ranks = sum(ranks_per_server)

    def session(self):
        return weight_update_session(self.client, self.loop, self.urls, self.timeout_s)

    def load(self, payloads: list[str], weight_version: str | None) -> None:
        self.loop.run(_gather_or_raise([
            self.client.update_weights_from_tensor(url, payloads[offset : offset + count],
                                                   weight_version=weight_version, timeout_s=self.timeout_s)
            for url, (offset, count) in zip(self.urls, self.slices, strict=True)
        ]))  # fmt: skip


def push_colocated(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *,
                   sender: TensorWeightSync | None = None,
                   weight_version: str | None = None) -> WeightSyncStats:  # fmt: skip
    """Collective over the trainer's ranks (torch.distributed's default group, or a single process): every rank
    iterates the same full tensors (on its own device), packs each bucket, serializes a handle to it, and global rank
    0 (which holds ``sender``) gathers the handles and has the servers load them. Every rank raises the same error if
    any step fails on any rank, at the same bucket, so no rank is left in a collective."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    def agree(error: str | None) -> str | None:  # rank 0's verdict, on every rank
        if not distributed:
            return error
        holder = [error]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    start, stats = time.perf_counter(), WeightSyncStats()
    session = sender.session() if rank == 0 and sender is not None else None
    error = None
    if rank == 0 and (sender is None or sender.ranks != world):
        error = f"colocated weight sync: {world} trainer rank(s) face {sender.ranks if sender else 0} server rank(s)"
    elif rank == 0:
        try:
            session.__enter__()
        except Exception as failure:
            error = f"opening the weight-update sessions failed: {failure}"
    if (error := agree(error)) is not None:
        raise RolloutError(error)
    try:
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            count, size = len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)
            flat = views = None
            try:
                with ipc_shareable_allocations():
                    flat, views = pack_bucket(bucket)
                mine = ("ok", serialize_named_tensors(views))
            except Exception as failure:
                mine = ("error", f"rank {rank}: {type(failure).__name__}: {failure}")
            gathered = [None] * world if rank == 0 else None
            if distributed:
                dist.gather_object(mine, gathered, dst=0)
            else:
                gathered = [mine]
            error = None
            if rank == 0:
                failed = [text for kind, text in gathered if kind == "error"]
                try:
                    if failed:
                        raise RolloutError("; ".join(failed))
                    sender.load([text for _, text in gathered], weight_version)
                except Exception as failure:
                    error = f"loading a weight bucket from tensor handles failed: {failure}"
            error = agree(error)  # also keeps every rank's buffer alive until the servers have loaded it
            del flat, views, bucket
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()  # free what the servers have let go of
            if error is not None:
                raise RolloutError(error)
            stats.buckets += 1
            stats.tensors += count
            stats.bytes += size
    except BaseException as failure:
        if session is not None:
            session.__exit__(type(failure), failure, failure.__traceback__)
        raise
    error = None
    if rank == 0:
        try:
            session.__exit__(None, None, None)
        except Exception as failure:
            error = f"closing the weight-update sessions failed: {failure}"
    if (error := agree(error)) is not None:
        raise RolloutError(error)
    stats.seconds = time.perf_counter() - start
    return stats


async def _gather_or_raise(coros) -> list:
    import asyncio

    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _result(future, timeout_s: float, what: str):
    """A request future's result; its own timeout fires first, this one only guards against a stuck loop."""
    try:
        return future.result(timeout=timeout_s + 30)
    except RolloutError:
        raise
    except Exception as error:
        raise RolloutError(f"{what} failed: {type(error).__name__}: {error}") from error


ANNOUNCE_GRACE_S = 15.0  # long enough for the client to find a dead server (a failed connect and a health probe)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:500] if lines else ""


def _server_down(future) -> bool:
    try:
        return future.done() and not future.cancelled() and isinstance(future.exception(), RolloutServerDown)
    except Exception:
        return False


def _failure(future) -> str | None:
    """The error of a finished request future, if it has one (to explain a failed collective)."""
    try:
        if future.done() and not future.cancelled() and future.exception() is not None:
            return str(future.exception())
    except Exception:
        return None
    return None

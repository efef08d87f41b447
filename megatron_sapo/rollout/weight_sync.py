"""Sending the trainer's weights to the rollout servers, in buckets of bounded size.

Both modes take the ``(hf_name, tensor)`` pairs the trainer produces on its global rank 0, in order, lazily (the
other trainer ranks are busy gathering the next tensors meanwhile):

- :class:`DiskWeightSync`: each bucket becomes one safetensors file of an HF-style folder (with its
  ``model.safetensors.index.json``); then every server reloads from it (``/update_weights_from_disk``). The folder
  must be visible to every server.
- :class:`DistributedWeightSync`: the trainer's rank 0 and every server rank form one process group, rank 0 being
  the trainer (``/init_weights_update_group``, answered while this side joins the rendezvous). Per bucket, the
  names, dtypes and shapes go to ``/update_weights_from_distributed`` while rank 0 broadcasts the tensors in that
  order; each server receives them into fresh buffers and loads them by name.

The group is built the way SGLang builds its side (``init_custom_process_group`` in
``python/sglang/srt/utils/common.py``: a TCP store hosted by the trainer, a ``PrefixStore`` named after the group,
torch's process-group constructor with no global ranks), so the two sides agree on the store keys, and it stays
apart from torchrun's default group: its own store, its own name, never the default. A failed sync leaves no half
group behind: the servers are told to drop theirs, and the next sync forms a new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_sapo.rollout.client import EventLoopThread, RolloutClient, RolloutError

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
                reason = _failure(announced) or f"{type(error).__name__}: {error}"
                self.close()
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


def _failure(future) -> str | None:
    """The error of a finished request future, if it has one (to explain a failed collective)."""
    try:
        if future.done() and not future.cancelled() and future.exception() is not None:
            return str(future.exception())
    except Exception:
        return None
    return None

"""Move the trainer's GPU state to host memory while the rollout engine uses the GPU, and back.

Params and grads use megatron-core 0.16's own hooks, ``offload_to_cpu``/``reload_from_cpu`` of the DDP param/grad
buffers (they free the device storage; the grad buffer comes back zeroed). The host copy of each param buffer is
allocated here, pinned only when CUDA exists (``pin_memory()`` fails on a CPU-only torch), and it is a separate
tensor even when the buffer already lives on the CPU: megatron's own ``param_data.cpu()`` would alias the CPU buffer
whose storage it then frees.

The optimizer is NOT moved with megatron's ``offload_to_cpu``/``restore_from_cpu``: they move every tensor of the
inner optimizer's param groups, and with the precision-aware path that the hybrid CPU optimizer needs, those are
bf16 views into the DDP param buffer. Offloaded after the params they read freed storage; restored, each becomes a
tensor of its own, so the hybrid optimizer's copy-back no longer reaches the model (and the copies stay on the GPU).
It would also move the hybrid optimizer's host state to the GPU. So :func:`optimizer_device_tensors` names what an
optimizer owns on the device (fp32 main params and Adam moments; with the hybrid optimizer only its GPU part's),
never a view of a DDP buffer, and :class:`HostCopies` moves exactly those through host buffers that are allocated
once and reused every step (pinned with CUDA, so the copies run at full PCIe speed).

On a CPU machine all of it really happens (storage freed and restored); the tests check both.
"""

from __future__ import annotations

import torch

# Host buffers are carved out of segments of this size. The pinned allocator rounds every allocation up to a power
# of two (torch's CachingHostAllocator), so one allocation per tensor or one for everything would waste up to half.
SEGMENT_BYTES = 1 << 30
_ALIGN = 64


def ddp_buffers(ddp_models):
    """The param/grad buffers of DDP-wrapped model chunks, dense and expert-parallel."""
    for model in ddp_models:
        yield from model.buffers
        yield from model.expert_parallel_buffers


def offload_params_and_grads(ddp_models, *, params: bool, grads: bool) -> None:
    for buffer in ddp_buffers(ddp_models):
        if params and buffer.param_data is not None and buffer.param_data_cpu is None:
            buffer.param_data_cpu = torch.empty(
                buffer.param_data.shape,
                dtype=buffer.param_data.dtype,
                device="cpu",
                pin_memory=torch.cuda.is_available(),
            )
        buffer.offload_to_cpu(move_params=params, move_grads=grads)
    _synchronize()  # the non-blocking copies into the pinned buffers are done before the storage is reused
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, so the rollout engine can use them


def reload_params_and_grads(ddp_models, *, params: bool, grads: bool) -> None:
    for buffer in ddp_buffers(ddp_models):
        buffer.reload_from_cpu(move_params=params, move_grads=grads)
    _synchronize()


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _sub_optimizers(optimizer):
    """The DistributedOptimizers of a (Chained)optimizer that hold state on this rank."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "optimizer", None) is not None and not getattr(sub, "is_stub_optimizer", False):
            yield sub


def optimizer_device_tensors(optimizer) -> list[torch.Tensor]:
    """The device tensors ``optimizer`` owns: main params and optimizer state, in a fixed order.

    Left out: anything sharing storage with a DDP param/grad buffer (the model's params, bf16 shards of the
    precision-aware path, fp32 models' main params, which are views of the model), the hybrid optimizer's CPU
    part (host memory already), host tensors, and 0-dim tensors (torch Adam's step counter)."""
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    found: dict[int, torch.Tensor] = {}
    for sub in _sub_optimizers(optimizer):
        model_storages = set()
        for buffer in getattr(sub, "buffers", []):
            for data in (buffer.param_data, buffer.grad_data):
                if data is not None:
                    model_storages.add(_storage_id(data))
        inner = sub.optimizer
        if isinstance(inner, HybridDeviceOptimizer):
            inner = inner.gpu_optimizer
            if inner is None:
                continue
        candidates = [p for group in inner.param_groups for p in group["params"]]
        candidates += [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        for tensor in candidates:
            if (tensor.device.type == device_type and tensor.dim() > 0
                    and _storage_id(tensor) not in model_storages):  # fmt: skip
                found.setdefault(id(tensor), tensor)
    return list(found.values())


class HostCopies:
    """Host copies of a fixed list of device tensors, allocated once: ``offload`` frees the device storage (the
    tensors stay the same objects, so every reference to them stays valid), ``reload`` restores it."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.nbytes = [t.untyped_storage().nbytes() for t in tensors]
        self.segments: list[torch.Tensor] = []
        self.copies: list[torch.Tensor | None] = [None] * len(tensors)
        self._allocate()

    def _allocate(self) -> None:
        segment_sizes, places = pack_segments(self.nbytes)
        pin = torch.cuda.is_available()
        self.segments = [torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=pin) for size in segment_sizes]
        for i, tensor in enumerate(self.tensors):
            segment, offset = places[i]
            raw = self.segments[segment][offset : offset + tensor.numel() * tensor.element_size()]
            self.copies[i] = raw.view(tensor.dtype).view(tensor.shape)

    @property
    def host_bytes(self) -> int:
        return sum(s.numel() for s in self.segments)

    def matches(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(a is b for a, b in zip(tensors, self.tensors))

    @torch.no_grad()  # the hybrid optimizer's fp32 params require grad
    def offload(self) -> None:
        for tensor, copy in zip(self.tensors, self.copies):
            if tensor.untyped_storage().nbytes() > 0:
                copy.copy_(tensor, non_blocking=True)
        _synchronize()
        for tensor in self.tensors:
            tensor.untyped_storage().resize_(0)

    @torch.no_grad()
    def reload(self) -> None:
        for tensor, copy, nbytes in zip(self.tensors, self.copies, self.nbytes):
            if tensor.untyped_storage().nbytes() == 0:
                tensor.untyped_storage().resize_(nbytes)
                tensor.copy_(copy, non_blocking=True)
        _synchronize()


def offload_optimizer(optimizer, copies: HostCopies | None) -> HostCopies | None:
    """Move the optimizer's device tensors to host memory; returns the host copies to reload them from (reused
    while the optimizer's tensors stay the same: Adam allocates its moments at the first step)."""
    tensors = optimizer_device_tensors(optimizer)
    if not tensors:
        return None
    if copies is None or not copies.matches(tensors):
        copies = HostCopies(tensors)
    copies.offload()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return copies


def reload_optimizer(copies: HostCopies | None) -> None:
    if copies is not None:
        copies.reload()


def device_bytes(ddp_models) -> dict[str, int]:
    """Bytes held by the param and grad buffers' storage (0 while offloaded)."""
    sizes = {"params": 0, "grads": 0}
    for buffer in ddp_buffers(ddp_models):
        if buffer.param_data is not None:
            sizes["params"] += buffer.param_data.untyped_storage().size()
        if buffer.grad_data is not None:
            sizes["grads"] += buffer.grad_data.untyped_storage().size()
    return sizes


def optimizer_device_bytes(optimizer) -> int:
    """Bytes of device storage the optimizer owns (0 while offloaded)."""
    return sum(t.untyped_storage().nbytes() for t in optimizer_device_tensors(optimizer))


def pack_segments(nbytes: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Host segments for tensors of ``nbytes`` each, first-fit decreasing: (segment sizes, (segment, offset) per
    tensor). A segment's size is a power of two, as the pinned allocator would round it to anyway."""
    segment_size = max([SEGMENT_BYTES, *[_pow2(n) for n in nbytes]])
    used: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(nbytes)
    for i in sorted(range(len(nbytes)), key=lambda i: -nbytes[i]):
        size = -(-nbytes[i] // _ALIGN) * _ALIGN
        segment = next((s for s, u in enumerate(used) if u + size <= segment_size), None)
        if segment is None:
            used.append(0)
            segment = len(used) - 1
        places[i] = (segment, used[segment])
        used[segment] += size
    return [_pow2(u) for u in used], places


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()

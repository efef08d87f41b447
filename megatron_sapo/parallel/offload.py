"""Move the trainer's GPU state to host memory while the rollout engine uses the GPU, and back.

Built on megatron-core 0.16's own hooks: ``offload_to_cpu``/``reload_from_cpu`` of the DDP param/grad buffers
(which free the device storage) and ``offload_to_cpu``/``restore_from_cpu`` of the optimizer (which moves its
CUDA state tensors to the host). One thing is added around them:
the host copy of each param buffer is allocated here, pinned only when CUDA exists (``pin_memory()`` fails on a
CPU-only torch), and it is a separate tensor even when the buffer already lives on the CPU — megatron's own
``param_data.cpu()`` would alias the CPU buffer whose storage it then frees. (Megatron's hooks skip buffers that
are already offloaded / already resident, so repeated calls are harmless.)

On a CPU machine the buffers' storage really is freed and restored (the tests check both), while the optimizer
hook has nothing to move (its state is already host memory).
"""

from __future__ import annotations

import torch


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
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, so the rollout engine can use them


def reload_params_and_grads(ddp_models, *, params: bool, grads: bool) -> None:
    for buffer in ddp_buffers(ddp_models):
        buffer.reload_from_cpu(move_params=params, move_grads=grads)


def offload_optimizer(optimizer) -> None:
    optimizer.offload_to_cpu()


def reload_optimizer(optimizer) -> None:
    optimizer.restore_from_cpu()


def device_bytes(ddp_models) -> dict[str, int]:
    """Bytes held by the param and grad buffers' storage (0 while offloaded)."""
    sizes = {"params": 0, "grads": 0}
    for buffer in ddp_buffers(ddp_models):
        if buffer.param_data is not None:
            sizes["params"] += buffer.param_data.untyped_storage().size()
        if buffer.grad_data is not None:
            sizes["grads"] += buffer.grad_data.untyped_storage().size()
    return sizes

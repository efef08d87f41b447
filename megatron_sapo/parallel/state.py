"""torch.distributed and Megatron-Core ``parallel_state`` set-up from torchrun's environment."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_sapo.parallel.cpu_device import enable_cpu_device_layer
from megatron_sapo.parallel.layout import ParallelLayout, validate_layout


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join torchrun's process group (NCCL with CUDA, gloo without); plain ``python`` gets a world of one."""
    enable_cpu_device_layer()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def initialize_model_parallel(
    layout: ParallelLayout, *, seed: int = 1234, arch=None, te: bool = False, training: bool = True
) -> None:
    """Validate ``layout`` for this world (and ``arch``), then build Megatron's process groups and RNG states."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed()
    validate_layout(layout, dist.get_world_size(), arch, te=te, training=training)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**layout.megatron_kwargs())
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

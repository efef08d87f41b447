"""The CPU device layer: makes megatron-core 0.16 run on CPU with the gloo backend.

megatron-core assumes CUDA in a number of places that are about *where* tensors live, not about what is
computed: it allocates on ``torch.cuda.current_device()`` or ``device="cuda"``, calls ``.cuda()``, checks
``param.type() == "torch.cuda.FloatTensor"``, synchronises and records CUDA streams/events, and saves/restores
the CUDA RNG state. On a machine without CUDA all of these fail, although the math is plain torch.

:func:`enable_cpu_device_layer` is the only place in megatron_sapo that patches another library. It does
nothing when CUDA is available. Otherwise it

1. enters a process-wide ``TorchFunctionMode`` that maps CUDA devices to the CPU in every torch call
   (factory ``device=`` arguments, ``Tensor.to``/``.cuda()``) and reports CPU tensors with their CUDA type
   name to ``Tensor.type()``, and
2. replaces a handful of ``torch.cuda`` functions and megatron helpers with CPU equivalents; each one below
   names the megatron-core code that needs it, and
3. enters the mode again where megatron runs a forward inside the autograd engine (activation recompute, see
   :func:`_in_mode`), and lets its hybrid device optimizer (``optimizer_cpu_offload``) tell "device" tensors from
   host copies while it splits the parameters between its GPU and CPU optimizers (:func:`_with_host_copies`).

Numerics are unchanged: every kernel that runs is torch's CPU kernel. Call it before building any megatron
object (``megatron_sapo.parallel.initialize`` does).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_mode: TorchFunctionMode | None = None
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Runs every torch call as if ``cuda`` meant ``cpu``.

    A mode is popped while its handler runs, so code that runs *inside* a handled call does not see it; that is
    why ``current_device()`` itself returns the CPU, and why activation recompute enters it again (:func:`_in_mode`).
    """

    host_copies: set[int] | None = None  # ids of host tensors while _host_copy_view() is active
    _keep: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            # optimizer/cpu_offloading/hybrid_optimizer.py allocates its host gradient copies with
            # `pin_memory=True`; without CUDA there is no pinned allocator, and ordinary memory is the same memory.
            kwargs["pin_memory"] = False
        if self.host_copies is None:
            return self._call(func, args, kwargs)
        # Device and host as two memory spaces of the CPU (see _with_host_copies): `.cpu()` of a device tensor
        # is a new host tensor, whatever is computed from a host tensor is one too, and `is_cuda` tells them apart.
        first = args[0] if args else None
        from_host = isinstance(first, torch.Tensor) and id(first) in self.host_copies
        if func == _IS_CUDA_GETTER:
            return not from_host
        target = args[1] if func is torch.Tensor.to and len(args) > 1 else None
        to_host = func is torch.Tensor.cpu or (isinstance(target, (str, torch.device)) and not _is_cuda(target))
        result = self._call(func, args, kwargs)
        if isinstance(result, torch.Tensor) and (to_host or from_host):
            if to_host and not from_host:
                result = result.clone()  # a device-to-host copy, never an alias of the device tensor
            self.host_copies.add(id(result))
            self._keep.append(result)  # keeps the ids unique while the view is active
        return result

    @staticmethod
    def _call(func, args, kwargs):
        if func is torch.Tensor.cuda:
            # tensor_parallel/layers.py, distributed/param_and_grad_buffer.py: `.cuda()` after CPU init.
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # optimizer/__init__.py and optimizer/distrib_optimizer.py accept only
            # 'torch.cuda.{Float,Half,BFloat16}Tensor' parameters.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.record_stream:
            # transformer/moe/token_dispatcher.py ties device-to-host copies to its side stream.
            return None
        if func is torch.Tensor.pin_memory:
            # Pinned memory needs a CUDA build; on CPU an ordinary tensor is the same memory.
            return args[0]
        return func(*args, **kwargs)


_IS_CUDA_GETTER = torch.Tensor.is_cuda.__get__


@contextlib.contextmanager
def _host_copy_view():
    _mode.host_copies, _mode._keep = set(), []
    try:
        yield
    finally:
        _mode.host_copies, _mode._keep = None, []


def _with_host_copies(method):
    """optimizer/cpu_offloading/hybrid_optimizer.py: ``_get_sub_optimizer_param_groups`` moves the first
    ``offload_fraction`` of the parameters that are ``is_cuda`` to host copies (``.clone().cpu().pin_memory()``,
    then ``.float()``) for its CPU optimizer and leaves the others to its GPU optimizer, by ``is_cuda`` again.
    On CPU nothing would be ``is_cuda``. While it runs, tensors made by ``.cpu()`` (and from them) count as host
    memory and everything else as device memory, so the split, the copies and the copy-back are megatron's own."""

    @functools.wraps(method)
    def partition(self, *args, **kwargs):
        with _host_copy_view():
            return method(self, *args, **kwargs)

    return partition


def _in_mode(method):
    """tensor_parallel/random.py: with activation recompute (``recompute_granularity: full``) the layers' forward
    runs again inside the autograd engine's backward, where the mode is not active, and allocates on
    ``device="cuda"`` (transformer/utils.py's causal mask) like any forward."""

    @functools.wraps(method)
    def recompute(*args, **kwargs):
        with _mode:
            return method(*args, **kwargs)

    return recompute


class _Stream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: everything on CPU is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # wait_stream, record_event, synchronize, ...: no-ops; record_event's result is waited on later.
        return lambda *args, **kwargs: _Stream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def enable_cpu_device_layer() -> bool:
    """Install the layer once per process when CUDA is absent. Returns whether it is active."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True

    # tensor_parallel/layers.py (also in the backward of its linear functions, which runs outside any
    # TorchFunctionMode), models/common/embeddings, distributed/*: `device=torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: _CPU
    # dist_checkpointing save, optimizer, timers: torch.cuda.synchronize() around collectives.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # transformer/moe/token_dispatcher.py, distributed/param_and_grad_buffer.py, pipeline_parallel/*:
    # side streams and events for overlapping communication.
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Stream
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.default_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    # tensor_parallel/random.py: the CUDA RNG tracker (dropout, parameter init) and activation recompute save
    # and restore "the device generator"; on CPU that is torch's default CPU generator.
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed, *args, **kwargs: torch.manual_seed(seed)
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, clone=False, **kwargs: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    # transformer/moe/moe_utils.py: RouterGatingLinearFunction tests `te_general_gemm is not None`, but the
    # name is only bound when Transformer Engine imported; without TE that test is a NameError.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # transformer/moe/token_dispatcher.py: the all-to-all split sizes become host numpy arrays only when
    # they were CUDA tensors (`maybe_move_tensor_to_cpu` tests `is_cuda`); all_to_all_single needs host sizes.
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    # tensor_parallel/random.py: the recomputed forward of activation checkpointing (see _in_mode).
    from megatron.core.tensor_parallel.random import CheckpointFunction, CheckpointWithoutOutput

    CheckpointFunction.backward = staticmethod(_in_mode(CheckpointFunction.backward))
    CheckpointWithoutOutput._recompute = _in_mode(CheckpointWithoutOutput._recompute)
    # optimizer/cpu_offloading/hybrid_optimizer.py: the GPU/CPU split of the hybrid optimizer (see above).
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    HybridDeviceOptimizer._get_sub_optimizer_param_groups = _with_host_copies(
        HybridDeviceOptimizer._get_sub_optimizer_param_groups
    )

    _mode = _CudaToCpuMode()
    _mode.__enter__()
    return True


def cpu_device_layer_active() -> bool:
    return _mode is not None


@functools.cache
def device() -> torch.device:
    """The device megatron-core computes on in this process."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

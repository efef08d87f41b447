"""Process groups, layout checks, offload, the CPU device layer and the megatron-core compatibility layer.

Importing this package (``megatron_sapo/__init__.py`` does, before anything can import megatron) installs one
import hook, the only import-time part of the CPU device layer (:mod:`megatron_sapo.parallel.cpu_device`): when
``megatron.core.jit`` is first imported on a machine without CUDA, megatron's own ``disable_jit_fuser()`` runs right
after it, before ``megatron.core.fusions`` decorates its kernels. Otherwise that decoration is ``torch.compile``,
which imports TorchDynamo and Inductor (2-5 s of every process start on 2 cores) for fused kernels that never run
on CPU: the model's configs keep ``bias_activation_fusion``/``apply_rope_fusion`` off without CUDA
(models/gpt.py). With CUDA nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class _JitFuserOffWithoutCuda(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)  # once: the module is imported once per process
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_disable(module):
            exec_module(module)
            import torch

            if not torch.cuda.is_available():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_then_disable
        return spec


if "megatron.core.jit" not in sys.modules and not any(isinstance(f, _JitFuserOffWithoutCuda) for f in sys.meta_path):
    sys.meta_path.insert(0, _JitFuserOffWithoutCuda())

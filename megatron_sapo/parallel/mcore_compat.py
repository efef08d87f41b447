"""Every difference between the two megatron-core releases we support, in one place.

megatron-core 0.16.1 is the newest release for Python 3.11; 0.17 and later need Python >= 3.12, where setup.py
takes 0.19.x. Both pairs (3.11 + 0.16.1, 3.12 + 0.19.2) run the suite in CI (README: "megatron-core versions").
Code elsewhere asks this module, never ``megatron.core.__version__``. What differs:

- **CUDA graphs off.** 0.16 warns on every config unless ``cuda_graph_scope=[]``; 0.19 renamed the field to
  ``cuda_graph_modules`` and warns when the old one is set (and when the new one is left at "full").
- **Checkpoint writer.** 0.16's ``FileSystemWriterAsync`` forks writer processes, 0.19's runs threads; the default
  ``thread_count`` fell from 2 to 1, which halves the writers and changes the number of shard files. We pass
  :data:`WRITER_THREADS` explicitly, so both versions write two shard files per rank. The results queue the
  writers report through is ``_get_write_results_queue()`` in 0.16 and ``get_write_results_queue(mp_mode)`` in 0.19.
- **Checkpoint format.** 0.19 stores the common state as a ``common_state`` ShardedObject instead of ``common.pt``;
  it reads 0.16 checkpoints, 0.16 cannot read its checkpoints (0.16 fails deep in ``load_common`` with a traceback).
  :func:`unreadable_checkpoint` turns that into one line before megatron is asked to load.
- **Log lines.** 0.19 logs "GPTModel IS DEPRECATED" at every model build, "MCore's async save is deprecated"
  at the first save (its synchronous save goes through the deprecated async path) and, at every DDP wrap with the
  distributed optimizer, that no ``full_param_layout`` was passed (DDP then computes it with the very call the
  notice recommends). None is actionable for a user of this package (README: "megatron-core versions" says what a
  move to ``HybridModel`` takes), so :func:`quiet_known_notices` filters exactly those messages out of megatron's
  loggers.
- **A failed checkpoint writer.** 0.19's writer threads trip an assertion on their own rank when one fails, before
  the gather of write results, so rank 0 never learns of it; ``checkpoint.save_sharded`` lets that rank report.
- **Top-k order.** 0.19's router takes ``torch.topk(..., sorted=torch.is_grad_enabled())``: under ``no_grad``
  (old log-probs, R2 recording) the chosen experts come in an unspecified order, in 0.16 by score. Nothing of
  ours depends on it, so nothing here pins it: the MoE output does not (the dispatcher scatters by expert id and the
  gate weights are gathered per chosen expert), replay hands the recorded ids back as a set would, and routing
  agreement (``models/routing_replay.py``) compares sorted sets.
"""

from __future__ import annotations

import functools
import json
import logging
import os

WRITER_THREADS = 2  # 0.16's default; 0.19's is 1 (see the module docstring)

_QUIET_MESSAGES = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    # 0.19's DDP computes the layout itself when none is passed, with the very call it recommends
    "megatron.core.distributed.distributed_data_parallel": "full_param_layout not provided",
}


@functools.cache
def mcore_version() -> tuple[int, int]:
    from megatron.core import package_info

    major, minor = package_info.__version__.split(".")[:2]
    return int(major), int(minor)


def at_least(major: int, minor: int) -> bool:
    return mcore_version() >= (major, minor)


def cuda_graphs_off() -> dict:
    """``TransformerConfig`` fields that turn CUDA graphs off without a deprecation warning."""
    return {"cuda_graph_modules": []} if at_least(0, 17) else {"cuda_graph_scope": []}


def write_results_queue():
    """The queue megatron's checkpoint writers report through (created, with its Manager process, on first use)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if at_least(0, 17):
        return filesystem_async.get_write_results_queue("spawn")
    return filesystem_async._get_write_results_queue()  # noqa: SLF001 (0.16's only name for it)


def save_sharded_strategy():
    """torch_dist with an explicit writer count (:data:`WRITER_THREADS`), the same files in both versions."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=WRITER_THREADS)


def unreadable_checkpoint(ckpt_dir: str) -> str | None:
    """Why this megatron-core cannot read the torch_dist checkpoint ``ckpt_dir`` (a phrase), or None.

    0.16 reads the common state from ``common.pt``, named by ``common_backend`` in ``metadata.json``; 0.17+ writes
    neither (the common state is a ShardedObject among the shards)."""
    if at_least(0, 17):
        return None
    try:
        with open(os.path.join(ckpt_dir, "metadata.json")) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None  # not a megatron checkpoint, or an incomplete one: checkpoint.checkpoint_problem says which
    if isinstance(metadata, dict) and "common_backend" not in metadata:
        if not os.path.exists(os.path.join(ckpt_dir, "common.pt")):
            version = ".".join(map(str, mcore_version()))
            return (
                f"was written by megatron-core 0.17 or later (no common.pt), which megatron-core {version} cannot "
                "read; load it under Python 3.12 (megatron-core 0.19), or convert it to HF there "
                "(tools/convert_mcore_to_hf.py) and back here (tools/convert_hf_to_mcore.py)"
            )
    return None


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


@functools.cache
def quiet_known_notices() -> None:
    """Filter the megatron-core 0.19 notices named in the module docstring out of its loggers (idempotent)."""
    for name, text in _QUIET_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessage(text))


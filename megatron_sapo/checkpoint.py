"""Megatron distributed checkpoints (torch_dist format), written atomically.

A checkpoint is written into ``<dir>.tmp`` and renamed to ``<dir>`` only after every rank has finished, so a
run killed while saving never leaves a half-written ``<dir>``: either the old one or the new one is there.

megatron-core's writer forks worker processes and waits on a queue for them; a worker that dies (it imports
``psutil``, for one) would leave the parent waiting forever. :func:`save_sharded` therefore runs the save under
a watchdog that turns a dead writer process or an overdue save into an error.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import shutil
import sys
import threading
import time

import torch.distributed as dist

from megatron_sapo.errors import InputError

METADATA_FILE = "metadata.json"  # written last by megatron's dist_checkpointing.save


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class _SaveWatchdog:
    """Kills the process with a clear message if a checkpoint writer child dies or the save overruns."""

    def __init__(self, what: str, timeout_s: float):
        self.what, self.timeout_s = what, timeout_s
        self.done = threading.Event()

    def _failed_children(self):
        # megatron's FileSystemWriterAsync keeps its workers only in a local list; the multiprocessing
        # registry of this process's children is the one place their exit codes can be read.
        children = list(multiprocessing.process._children)  # noqa: SLF001
        return [p for p in children if p.exitcode not in (None, 0)]

    def _watch(self):
        deadline = time.monotonic() + self.timeout_s
        while not self.done.wait(0.5):
            failed = self._failed_children()
            if failed or time.monotonic() > deadline:
                reason = (
                    f"a checkpoint writer process exited with code {failed[0].exitcode}"
                    if failed
                    else f"it did not finish within {self.timeout_s:.0f}s"
                )
                sys.stderr.write(f"error: saving {self.what} failed: {reason}; the previous checkpoint is intact\n")
                faulthandler.dump_traceback(sys.stderr)
                sys.stderr.flush()
                os._exit(1)

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="checkpoint-save-watchdog").start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        return False


def save_sharded(
    sharded_state_dict: dict, ckpt_dir: str, *, extra_files: dict[str, str] | None = None, timeout_s: float = 3600.0
) -> None:
    """Collective: save a Megatron sharded state dict to ``ckpt_dir`` atomically (an existing one is replaced).

    ``extra_files`` (name → text) are written by rank 0 into the checkpoint folder before it is published.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = os.path.abspath(ckpt_dir)
    tmp_dir = ckpt_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    _barrier()
    with _SaveWatchdog(ckpt_dir, timeout_s):
        dist_checkpointing.save(sharded_state_dict, tmp_dir)
    _barrier()
    if _rank() == 0:
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp_dir, name), "w") as f:
                f.write(text)
        replace_dir(tmp_dir, ckpt_dir)
    _barrier()


def replace_dir(src: str, dst: str) -> None:
    """Put ``src`` at ``dst``; an existing ``dst`` survives until the new one is in place."""
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def is_complete_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, METADATA_FILE))


def load_sharded(sharded_state_dict: dict, ckpt_dir: str, *, field: str = "checkpoint") -> dict:
    """Collective: load ``ckpt_dir`` into the shapes/shardings described by ``sharded_state_dict``."""
    from megatron.core import dist_checkpointing

    if not is_complete_checkpoint(ckpt_dir):
        raise InputError(
            f"{field}: {ckpt_dir} is not a complete Megatron distributed checkpoint (no {METADATA_FILE}); "
            "point it at a folder written by tools/convert_hf_to_mcore.py or by the trainer"
        )
    check_tensor_shapes(sharded_state_dict, ckpt_dir, field=field)
    return dist_checkpointing.load(sharded_state_dict, ckpt_dir)


def checkpoint_dtype(ckpt_dir: str):
    """The dtype the checkpoint's tensors were saved in (of its first tensor)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return next(iter(metadata.values())).dtype


def check_tensor_shapes(sharded_state_dict: dict, ckpt_dir: str, *, field: str = "checkpoint") -> None:
    """One clear line for a tensor the checkpoint lacks or holds with another global shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    for expected in nested_values(sharded_state_dict):
        if not isinstance(expected, ShardedTensor):
            continue
        if expected.key not in stored:
            raise InputError(f"{field}: {ckpt_dir} has no tensor {expected.key}; it was written for a different model")
        shape = tuple(stored[expected.key].global_shape)
        if shape != tuple(expected.global_shape):
            raise InputError(
                f"{field}: tensor {expected.key} in {ckpt_dir} has shape {list(shape)}, the model expects "
                f"{list(expected.global_shape)}; the checkpoint was written for a different model config"
            )


# --- the trainer's checkpoint folder: checkpoints/iter_NNNNNNN + a `latest` pointer ------------------------------

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"


def step_dir(checkpoints_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir, f"iter_{step:07d}")


def latest_checkpoint(checkpoints_dir: str) -> str | None:
    """The folder the `latest` pointer names, if it is a complete checkpoint."""
    try:
        with open(os.path.join(checkpoints_dir, LATEST_FILE)) as f:
            path = os.path.join(checkpoints_dir, f.read().strip())
    except FileNotFoundError:
        return None
    return path if is_complete_checkpoint(path) else None


def publish_latest(checkpoints_dir: str, ckpt_dir: str, keep: int) -> None:
    """Rank 0: point `latest` at ``ckpt_dir`` (atomically), then delete all but the newest ``keep`` checkpoints."""
    pointer = os.path.join(checkpoints_dir, LATEST_FILE)
    with open(pointer + ".tmp", "w") as f:
        f.write(os.path.basename(ckpt_dir))
    os.replace(pointer + ".tmp", pointer)
    steps = sorted(d for d in os.listdir(checkpoints_dir) if d.startswith("iter_") and "." not in d)
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(checkpoints_dir, old), ignore_errors=True)

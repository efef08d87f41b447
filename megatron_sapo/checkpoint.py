"""Megatron distributed checkpoints (torch_dist format), written atomically.

A checkpoint is written into ``<dir>.tmp`` and renamed to ``<dir>`` only after every rank has finished, so a
run killed while saving never leaves a half-written ``<dir>``: either the old one or the new one is there. The last
file written before the rename is ``manifest.json`` (every file, its size and its xxh3-64 checksum): a checkpoint is
trusted only when its files match it (:func:`checkpoint_problem`), which catches a shard truncated, lost or damaged
after the fact. Each rank hashes the shard files it wrote (``__<rank>_<n>.distcp``; rank 0 the rest), in parallel,
and at load each rank verifies the same share of the world it loads in, so neither side reads a byte twice on
one rank. Saves check
the free space first and turn a failed write (a full disk) into one :class:`RunError` line, the partial folder
removed. Saves go through megatron's fully-parallel wrapper over the data-parallel group (the replicas of a tensor
share its writing, so no rank writes more than its share); loads can (``fully_parallel=True``) but do not by default:
on CPU/gloo that made loads 1.1-2.7x slower (bench/checkpoint_bench.py), and it only saves reads of replicated
tensors, a few percent of a checkpoint whose bulk is the data-parallel-sharded optimizer state.

megatron-core's writer forks worker processes and waits on a queue for them; a worker that dies (it imports
``psutil``, for one) would leave the parent waiting forever. :func:`save_sharded` therefore runs the save under
a watchdog that turns a dead writer process or an overdue save into an error.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time

import torch.distributed as dist
import xxhash

from megatron_sapo.errors import InputError, RunError
from megatron_sapo.parallel.mcore_compat import (
    WRITER_THREADS,
    quiet_known_notices,
    save_sharded_strategy,
    unreadable_checkpoint,
)

METADATA_FILE = "metadata.json"  # written by megatron's dist_checkpointing.save once the shards are
MANIFEST_FILE = "manifest.json"  # every file of the checkpoint, its size and checksum, written last (before the rename)
CHECKSUM = "xxh3_64"  # the manifest's hash: xxhash's XXH3, 64 bits (several GB/s per core, so a save hardly notices)


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
    sharded_state_dict: dict,
    ckpt_dir: str,
    *,
    extra_files: dict[str, str] | None = None,
    timeout_s: float = 3600.0,
    fully_parallel: bool = True,
    expected_bytes: int | None = None,
    parts: dict[str, dict] | None = None,
    checksum: bool = True,
) -> None:
    """Collective: save a Megatron sharded state dict to ``ckpt_dir`` atomically (an existing one is replaced).

    ``parts`` (folder name → sharded state dict) are further Megatron checkpoints saved in subfolders of the same
    atomic save (the critic's beside the actor's: megatron-core's distributed-optimizer keys,
    ``optimizer.distributed.dp_group_idx_*``, take no prefix, so two optimizers cannot share one checkpoint).

    ``extra_files`` (name → text) are written by rank 0 into the checkpoint folder before it is published; the
    manifest (every file, its size and, with ``checksum``, its xxh3-64 hash) is written last, so a checkpoint is
    complete exactly when its manifest says so (``checksum=False``: sizes only, for bench/checkpoint_bench.py).
    Raises :class:`RunError` on every rank, with the partial folder removed, when the disk has too little room
    (checked before writing, against ``expected_bytes``, e.g. the size of the run's previous checkpoint, or else an
    estimate from the tensors) or the save fails.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = os.path.abspath(ckpt_dir)
    tmp_dir = ckpt_dir + ".tmp"
    parts = parts or {}
    mine = _bytes_to_write(sharded_state_dict) + sum(_bytes_to_write(part) for part in parts.values())
    estimate = _all_ranks_sum(mine)  # collective: on every rank, whatever the case
    needed = expected_bytes or estimate
    verdict = None
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(ckpt_dir), exist_ok=True)
        shortage = _space_shortage(os.path.dirname(ckpt_dir), needed, _files_to_write() * (1 + len(parts)))
        if shortage:
            verdict = _disk_full_message(ckpt_dir, shortage, "nothing was written")
        else:
            os.makedirs(tmp_dir)
    verdict = _from_rank0(verdict)
    if verdict:
        raise RunError(verdict)
    try:
        with _SaveWatchdog(ckpt_dir, timeout_s):
            dist_checkpointing.save(sharded_state_dict, tmp_dir, sharded_strategy=_save_strategy(fully_parallel))
            for name, part in parts.items():
                if _rank() == 0:
                    os.makedirs(os.path.join(tmp_dir, name))
                _barrier()
                dist_checkpointing.save(part, os.path.join(tmp_dir, name),
                                        sharded_strategy=_save_strategy(fully_parallel))  # fmt: skip
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        # No collective from here on: one that a rank still inside megatron's save could pair up with would hang
        # or mix up data. megatron hands rank 0 every rank's write errors, so rank 0 alone says what happened.
        if _rank() == 0:
            raise RunError(_save_failed(ckpt_dir, needed, error)) from None
        if not isinstance(error, CheckpointException):
            # Raised on this rank alone, before megatron's gather of the write results, so rank 0 waits there
            # and cannot report it (megatron-core 0.19: a failed writer thread trips an assertion on its own rank).
            raise RunError(_save_failed(ckpt_dir, needed, error), only_this_rank=True) from None
        raise RunError(_error_text(error)) from None
    verdict = None
    if _rank() == 0:
        try:
            for name, text in (extra_files or {}).items():
                _write_synced(os.path.join(tmp_dir, name), text)
        except OSError as error:
            verdict = _save_failed(ckpt_dir, needed, error)
    verdict = _from_rank0(verdict)  # also the barrier: every shard and extra file is written before hashing starts
    if verdict:
        raise RunError(verdict)
    checksums, problem = {}, None
    if checksum:
        try:
            checksums = file_checksums(tmp_dir, _my_share(_files_of(tmp_dir)))
        except OSError as error:
            problem = f"hashing it failed on rank {_rank()}: {error}"
    gathered = _all_gather((checksums, problem))
    if _rank() == 0:
        problems = [p for _, p in gathered if p]
        try:
            if problems:
                raise OSError(problems[0])
            write_manifest(tmp_dir, {name: digest for part, _ in gathered for name, digest in part.items()})
            replace_dir(tmp_dir, ckpt_dir)
        except OSError as error:
            verdict = _save_failed(ckpt_dir, needed, error)
    verdict = _from_rank0(verdict)  # also the barrier that keeps the others until the checkpoint is in place
    if verdict:
        raise RunError(verdict)


# A save needs the tensor bytes plus the metadata and pickled objects next to them.
SPACE_MARGIN = 1.05


# Each tensor written is a torch.save record of its own in a shard file (header, alignment; ~1.7 KiB measured).
ITEM_OVERHEAD_BYTES = 2048


def _bytes_to_write(sharded_state_dict: dict) -> int:
    """Bytes this rank's share of the checkpoint takes (main replicas only: the others are not written)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    return sum(
        value.data.numel() * value.data.element_size() + ITEM_OVERHEAD_BYTES
        for value in nested_values(sharded_state_dict)
        if isinstance(value, ShardedTensor) and value.data is not None and is_main_replica(value.replica_id)
    )


def checkpoint_bytes(ckpt_dir: str) -> int | None:
    """The size of a complete checkpoint, from its manifest (None without one)."""
    try:
        with open(os.path.join(ckpt_dir, MANIFEST_FILE)) as f:
            return sum(json.load(f)["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _files_to_write() -> int:
    # WRITER_THREADS shard files per rank, .metadata, common.pt (megatron-core 0.16), metadata.json, the trainer's
    # files and the manifest.
    world = dist.get_world_size() if dist.is_initialized() else 1
    return WRITER_THREADS * world + 8


def _space_shortage(folder: str, needed_bytes: int, needed_files: int) -> str | None:
    """What the file system at ``folder`` lacks for a checkpoint, or None."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free < needed_bytes * SPACE_MARGIN:
        return f"{_mib(free)} free on {folder}, the checkpoint needs about {_mib(needed_bytes * SPACE_MARGIN)}"
    if stat.f_files and stat.f_favail < needed_files:  # f_files == 0: the file system has no inode limit
        return f"{stat.f_favail} free inodes on {folder}, the checkpoint needs {needed_files} files"
    return None


def _save_failed(ckpt_dir: str, needed_bytes: int, error: BaseException) -> str:
    """The rank that reports a failed save: the message, with the partial folder removed."""
    text = _error_text(error)
    folder = os.path.dirname(ckpt_dir)
    shortage = _space_shortage(folder, needed_bytes, 1)
    shutil.rmtree(ckpt_dir + ".tmp", ignore_errors=True)
    if _is_disk_full(text) or shortage:
        stat = os.statvfs(folder)
        return _disk_full_message(ckpt_dir, shortage or f"{_mib(stat.f_bavail * stat.f_frsize)} free on {folder} "
                                  f"when the write failed, the checkpoint needs about {_mib(needed_bytes)}",
                                  "the partial save was removed")  # fmt: skip
    return (f"saving checkpoint {ckpt_dir} failed ({text}); the partial save was removed and the checkpoints before "
            "it are intact")  # fmt: skip


def _disk_full_message(ckpt_dir: str, shortage: str, what_happened: str) -> str:
    return (
        f"saving checkpoint {ckpt_dir} failed: the disk is full ({shortage}); {what_happened} and the checkpoints "
        "before it are intact; free space or point trainer.output_dir at a larger disk"
    )


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _is_disk_full(text: str) -> bool:
    return "No space left on device" in text or "[Errno 28]" in text or "Disk quota exceeded" in text


def _error_text(error: BaseException) -> str:
    """The error and its causes on one line (megatron wraps the writer's OSError in several layers)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(" ".join(part.split()) for part in parts)[:2000]


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _save_strategy(fully_parallel: bool):
    """torch_dist with megatron's fully-parallel wrapper: the data-parallel replicas of a tensor share its writing
    instead of DP rank 0 writing it all."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    quiet_known_notices()
    strategy = save_sharded_strategy()
    if not fully_parallel or not ps.model_parallel_is_initialized():
        return strategy
    return FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))


def _load_strategy(ckpt_dir: str, fully_parallel: bool):
    """Each data-parallel replica reads a share of the replicated tensors and they exchange the rest."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(ckpt_dir)
    if not fully_parallel or not ps.model_parallel_is_initialized():
        return strategy
    return FullyParallelLoadStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _all_ranks_sum(value: int) -> int:
    return sum(_all_gather(value))


def _from_rank0(value):
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def replace_dir(src: str, dst: str) -> None:
    """Put ``src`` at ``dst``; an existing ``dst`` survives until the new one is in place."""
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# --- verification: a manifest of every file and its size, written last -------------------------------------------


def write_manifest(folder: str, checksums: dict[str, str] | None = None) -> None:
    """Record every file under ``folder`` with its size (and its checksum, where ``checksums`` has one) in
    ``manifest.json``, written atomically, last."""
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in _files_of(folder)}
    manifest: dict = {"files": files}
    if checksums:
        manifest |= {"checksum": CHECKSUM, "checksums": {name: checksums[name] for name in sorted(checksums)}}
    _write_synced(os.path.join(folder, MANIFEST_FILE + ".tmp"), json.dumps(manifest, indent=0, sort_keys=True))
    os.replace(os.path.join(folder, MANIFEST_FILE + ".tmp"), os.path.join(folder, MANIFEST_FILE))


def _files_of(folder: str) -> list[str]:
    """Every file under ``folder`` (relative paths, sorted), the manifest and its temporary file excluded."""
    names = []
    for root, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(root, name), folder) for name in files]
    return sorted(n for n in names if n not in (MANIFEST_FILE, MANIFEST_FILE + ".tmp"))


_SHARD_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # torch_dist's shard files: __<writing rank>_<n>.distcp


def _owner(name: str, world: int) -> int:
    """The rank that hashes (at save) or verifies (at load) a file: a shard's writer, modulo the world it is
    loaded in; rank 0 for the rest (metadata, common state, the trainer's files)."""
    match = _SHARD_FILE.fullmatch(os.path.basename(name))
    return int(match.group(1)) % world if match else 0


def _my_share(names: list[str]) -> list[str]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return [name for name in names if _owner(name, world) == _rank()]


HASH_CHUNK_BYTES = 8 * 2**20


def file_checksums(folder: str, names: list[str]) -> dict[str, str]:
    """``{name: xxh3-64 hex digest}`` of the files ``names`` under ``folder``, read in 8 MiB chunks."""
    digests = {}
    for name in names:
        hasher = xxhash.xxh3_64()
        with open(os.path.join(folder, name), "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                hasher.update(chunk)
        digests[name] = hasher.hexdigest()
    return digests


def checkpoint_problem(ckpt_dir: str, *, required: tuple[str, ...] = (), verify: str = "all") -> str | None:
    """Why ``ckpt_dir`` cannot be trusted (one phrase), or None when it is complete.

    A checkpoint with a manifest must hold every file it lists, at the listed size (a truncated or lost shard shows
    up here, before megatron reads anything) and, where the manifest has checksums, with the listed content;
    one without a manifest (converted by an older version) needs its metadata.json. ``required`` files must be
    listed in the manifest, so their absence makes a manifest mandatory. ``verify``: whose checksums this call
    checks: ``all`` (one process), ``mine`` (this rank's share; :func:`verified_problem` gathers the verdicts),
    or ``none`` (sizes only)."""
    if not os.path.isdir(ckpt_dir):
        return "does not exist"
    manifest_path = os.path.join(ckpt_dir, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        if required:
            return f"has no {MANIFEST_FILE} (its save never finished, or a version without manifests wrote it)"
        return None if is_complete_checkpoint(ckpt_dir) else f"has no {METADATA_FILE}, so it is not a complete save"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files, checksums = manifest["files"], manifest.get("checksums") or {}
        if checksums and manifest.get("checksum") != CHECKSUM:
            return f"has a {MANIFEST_FILE} with {manifest.get('checksum')!r} checksums, which this version cannot check"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"has an unreadable {MANIFEST_FILE} ({error})"
    for name in required:
        if name not in files:
            return f"lacks {name}"
    for name, size in sorted(files.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            return f"lacks {name}"
        actual = os.path.getsize(path)
        if actual != size:
            return f"has {name} truncated ({actual} of {size} bytes)"
    hashed = sorted(set(checksums) & set(files))  # every listed file, in a manifest this package wrote
    to_check = {"all": hashed, "mine": _my_share(hashed), "none": []}[verify]
    try:
        actual = file_checksums(ckpt_dir, to_check)
    except OSError as error:
        return f"has a file that cannot be read ({error})"
    for name in to_check:
        if actual[name] != checksums[name]:
            return (f"has {name} damaged (its {CHECKSUM} checksum is {actual[name]}, the manifest says "
                    f"{checksums[name]})")  # fmt: skip
    return None


def verified_problem(ckpt_dir: str, *, required: tuple[str, ...] = ()) -> str | None:
    """Collective :func:`checkpoint_problem`: each rank verifies its share of the checksums, every rank gets the
    same verdict (the first problem by rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return checkpoint_problem(ckpt_dir, required=required)
    problems = _all_gather(checkpoint_problem(ckpt_dir, required=required, verify="mine"))
    return next((p for p in problems if p), None)


def is_complete_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, METADATA_FILE))


def load_sharded(
    sharded_state_dict: dict, ckpt_dir: str, *, field: str = "checkpoint", fully_parallel: bool = False
) -> dict:
    """Collective: load ``ckpt_dir`` into the shapes/shardings described by ``sharded_state_dict``."""
    from megatron.core import dist_checkpointing

    problem = verified_problem(ckpt_dir)
    if problem:
        raise InputError(
            f"{field}: {ckpt_dir} {problem}; point it at a complete folder written by tools/convert_hf_to_mcore.py or "
            "by the trainer"
        )
    unreadable = unreadable_checkpoint(ckpt_dir)
    if unreadable:
        raise InputError(f"{field}: {ckpt_dir} {unreadable}")
    check_tensor_shapes(sharded_state_dict, ckpt_dir, field=field)
    strategy = _load_strategy(ckpt_dir, fully_parallel)
    return dist_checkpointing.load(sharded_state_dict, ckpt_dir, sharded_strategy=strategy)


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
# algorithm.adv_estimator=gae: the critic's model, optimizer and scheduler, a Megatron checkpoint of its own here.
CRITIC_DIR = "critic"


def step_dir(checkpoints_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir, f"iter_{step:07d}")


def saved_steps(checkpoints_dir: str) -> list[int]:
    """Steps of the published checkpoint folders (``iter_NNNNNNN``), newest first."""
    try:
        names = os.listdir(checkpoints_dir)
    except FileNotFoundError:
        return []
    return sorted((int(n[5:]) for n in names if n.startswith("iter_") and n[5:].isdigit()), reverse=True)


def latest_step(checkpoints_dir: str) -> int | None:
    """The step the `latest` pointer names (None without a readable pointer)."""
    try:
        with open(os.path.join(checkpoints_dir, LATEST_FILE)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def resume_candidates(
    checkpoints_dir: str, required: tuple[str, ...] = (TRAINER_STATE_FILE,)
) -> tuple[str | None, list[str]]:
    """The newest trustworthy checkpoint for ``trainer.resume=auto`` and why each newer one was passed over.

    Candidates are the `latest` one and those older than it (a folder newer than `latest` was renamed into place but
    never published); each must pass :func:`verified_problem` with the ``required`` files. Collective when
    torch.distributed is up: every rank verifies its share of each candidate and all get the same answer."""
    newest = latest_step(checkpoints_dir)
    skipped = []
    for step in saved_steps(checkpoints_dir):
        if newest is not None and step > newest:
            continue
        path = step_dir(checkpoints_dir, step)
        unreadable = unreadable_checkpoint(path)
        if unreadable:  # not damaged: passing over it would resume from an older one and later delete it
            raise InputError(f"trainer.resume=auto: {path} {unreadable}")
        problem = verified_problem(path, required=required)
        if problem is None:
            return path, skipped
        skipped.append(f"{os.path.basename(path)} {problem}")
    return None, skipped


def remove_partial_saves(checkpoints_dir: str) -> None:
    """Rank 0: delete what killed saves left behind (``iter_N.tmp``, ``iter_N.old``); it only takes space."""
    try:
        names = os.listdir(checkpoints_dir)
    except FileNotFoundError:
        return
    for name in names:
        # An .old folder is garbage once its replacement is in place (replace_dir renames the new one in second).
        stem = name.rsplit(".", 1)[0]
        if name.startswith("iter_") and (name.endswith(".tmp") or (name.endswith(".old") and stem in names)):
            shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)


def publish_latest(checkpoints_dir: str, ckpt_dir: str, keep: int) -> None:
    """Rank 0: point `latest` at ``ckpt_dir`` (atomically), then delete all but the newest ``keep`` checkpoints."""
    pointer = os.path.join(checkpoints_dir, LATEST_FILE)
    with open(pointer + ".tmp", "w") as f:
        f.write(os.path.basename(ckpt_dir))
    os.replace(pointer + ".tmp", pointer)
    steps = sorted(d for d in os.listdir(checkpoints_dir) if d.startswith("iter_") and "." not in d)
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(checkpoints_dir, old), ignore_errors=True)

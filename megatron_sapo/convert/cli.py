"""What the conversion CLIs share: host-only processes, no optional-GPU-package notices, one closing summary line.

Kept free of heavy imports: megatron's checkpoint writer starts a spawn-context helper process that re-runs the
CLI module's top level, so whatever that level imports is paid twice.
"""

from __future__ import annotations

import os
import re
import threading
import warnings

# megatron-core announces, once per importing module, that it falls back from Transformer Engine / Apex: a dozen
# lines per process. Conversion never uses either package, so the notice carries nothing.
OPTIONAL_GPU_PACKAGE_NOTICE = r"(?s).*(Transformer Engine|Apex)\b.*\bnot installed"

# HF's units for max_shard_size ("5GB" = 5 * 10**9 bytes, as save_pretrained counts them)
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}


# glibc's malloc raises its mmap threshold to the size of each freed block (up to 32 MB), after which the
# converter's MB-sized temporaries (an expert's merged gate/up, ...) come from the heap and leave holes between the
# tensors that are kept: measured +21% RSS on a 2 GB model. A fixed threshold keeps them in their own mappings,
# returned to the system when freed.
MMAP_THRESHOLD_BYTES = 2**20
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def host_only_quiet() -> None:
    """Call before torch is imported. Conversion is disk-bound and runs on the host (gloo) even on GPU nodes;
    hiding the GPUs keeps every rank's shards in host memory, where the reader and the writer need them."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: its allocator's own policy applies
        pass
    warnings.filterwarnings("ignore", message=OPTIONAL_GPU_PACKAGE_NOTICE)
    # torch.distributed.checkpoint's deprecation notices about the APIs megatron-core calls: nothing a user of the
    # CLI can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # megatron-core's advice on training settings (sequence parallelism with expert TP = 1, CUDA connections)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core\.")


def start_writer_results_service() -> threading.Thread:
    """Start, in the background, the helper process megatron's checkpoint writer reports through; join the thread
    before saving.

    megatron-core's ``FileSystemWriterAsync`` (dist_checkpointing/strategies/filesystem_async.py; the queue's
    name differs by version, see :func:`megatron_sapo.parallel.mcore_compat.write_results_queue`) collects its
    writers' results in a queue served by a spawn-context
    ``multiprocessing`` Manager, started on the first save and kept for the next ones. That process unpickles the
    results, ``torch.distributed.checkpoint`` objects, so the first save waits at its end while it imports them:
    2.7 s measured on an idle machine, over 5 s on a loaded one. Here it is started as soon as megatron is imported
    and sent one such object, so that it imports them while this process sets up its process groups and builds the
    model. Should anything fail here, the save starts the Manager itself, as it otherwise would.
    """
    # imported here, on the calling thread: megatron's package imports are not safe to run on two threads at once
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from megatron_sapo.parallel.mcore_compat import write_results_queue

    def warm_up():
        try:
            results = write_results_queue()
            results.put(MetadataIndex("warm-up"))
            results.get()  # the queue is empty again before the save's writers put their results
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=warm_up, name="checkpoint-writer-results-warm-up", daemon=True)
    thread.start()
    return thread


def end_child_processes() -> None:
    """End this process's ``multiprocessing`` children once the checkpoint is written: megatron's results Manager
    (above) lives until the interpreter exits, and multiprocessing's exit handler then waits up to 1 s for it to
    tear torch down (Lib/multiprocessing/managers.py, ``_finalize_manager``). It holds no data by then."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join()


def exit_without_teardown(status: int) -> None:
    """Exit once the output is complete (written, fsynced, renamed into place; process groups destroyed) without
    the interpreter's teardown: with torch, torch.compile's modules and megatron loaded, collecting and clearing
    them takes 1-2 s (measured: 2 s after the same imports alone, 0.1 s with this) and frees nothing the finished
    run still needs."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def parse_size(text: str) -> int:
    """``"5GB"``, ``"200KB"``, ``"1000"`` → bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or "B"])


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM: it restarts at exec, unlike getrusage's ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


def summary_line(what: str, tensors: int, nbytes: int, seconds: float, peak_rss: int) -> str:
    """The CLIs' last line; bench/convert_bench.py parses it."""
    return (
        f"{what}: {tensors} tensors, {nbytes / 1e9:.3f} GB in {seconds:.1f} s ({nbytes / 1e9 / seconds:.2f} GB/s), "
        f"peak RSS {peak_rss / 1e9:.2f} GB per process"
    )

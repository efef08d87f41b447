"""Trainer checkpoints three ways, side by side in one run: megatron's plain torch_dist save/load, its
fully-parallel wrappers, and the trainer's way (plain load, fully-parallel save) without the manifest's checksums.

    torchrun --nproc_per_node=2 bench/checkpoint_bench.py --hf-dir HF [--repeats 3] [key=value ...]

The configuration is the CPU demo's (recipes/tiny_moe/config.yaml: EP=2, so DP=2 for the dense weights).

The actor (model, distributed optimizer, scheduler, RNG: what the trainer saves) is saved and loaded ``--repeats``
times each way, alternating (the order reversed every other repeat). Printed per way: the bytes each rank wrote
(the shard files ``__<rank>_<n>.distcp``)
and the median save and load times, and the checksums' cost as the ratio of the trainer's way with them (hashing
every file at save, verifying it at load, each rank its own share) to the same without. Without the fully-parallel
wrapper a tensor replicated over data-parallel ranks (every dense weight when DP > 1) is written by DP rank 0
alone; with it the replicas split the writing, and on load each reads a share and they exchange the rest.
``--hf-dir``: e.g. the tiny model of ``megatron_sapo.models.tiny.make_tiny_model``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch.distributed as dist

from megatron_sapo.actor import MegatronActor
from megatron_sapo.checkpoint import load_sharded, save_sharded
from megatron_sapo.config import load_config
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0


def bytes_per_rank(ckpt_dir: str, world: int) -> list[int]:
    sizes = [0] * world
    for name in os.listdir(ckpt_dir):
        if name.startswith("__") and name.endswith(".distcp"):
            sizes[int(name[2:].split("_")[0])] += os.path.getsize(os.path.join(ckpt_dir, name))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="e.g. actor.megatron.expert_model_parallel_size=2")
    args = parser.parse_args()
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes/tiny_moe/config.yaml")
    config = load_config(recipe, [f"model.path={args.hf_dir}", "model.mcore_checkpoint=null", *args.overrides],
                         world_size=int(os.environ.get("WORLD_SIZE", "1")), check_paths=False)  # fmt: skip
    arch = load_arch(args.hf_dir)
    initialize_model_parallel(config.actor.megatron.layout, seed=config.actor.megatron.seed, arch=arch)
    actor = MegatronActor(config, arch)
    actor.load_initial_weights()
    actor._allocate_torch_optimizer_state()  # noqa: SLF001 (Adam's state as after a first step, to be saved)
    root = [tempfile.mkdtemp(prefix="ckpt-bench-") if is_rank0() else None]
    dist.broadcast_object_list(root)
    ways = {  # name: (fully-parallel save/load, checksums)
        "torch_dist": (False, True),
        "torch_dist + fully parallel": (True, True),
        "trainer's, no checksums": (None, False),
        "trainer's (checksums)": (None, True),
    }
    results: dict[str, dict[str, list]] = {way: {"save": [], "load": [], "bytes": []} for way in ways}
    for repeat in range(args.repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))  # no way always runs first or last
        for way in order:
            fully_parallel, checksum = ways[way]
            save_parallel, load_parallel = (True, False) if fully_parallel is None else (fully_parallel,) * 2
            folder = os.path.join(root[0], f"{repeat}_{list(ways).index(way)}")
            dist.barrier()
            start = time.perf_counter()
            save_sharded(actor.sharded_state_dict(), folder, fully_parallel=save_parallel, checksum=checksum)
            results[way]["save"].append(time.perf_counter() - start)
            results[way]["bytes"] = bytes_per_rank(folder, dist.get_world_size())
            dist.barrier()
            start = time.perf_counter()
            load_sharded(actor.sharded_state_dict(is_loading=True), folder, fully_parallel=load_parallel)
            results[way]["load"].append(time.perf_counter() - start)
    if is_rank0():
        print(f"world {dist.get_world_size()}, layout {config.actor.megatron.layout}, {args.repeats} repeats")
        print(f"{'strategy':<30}{'MiB written per rank':<28}{'save s (median)':<18}{'load s (median)':<16}")
        median = {way: {k: statistics.median(r[k]) for k in ("save", "load")} for way, r in results.items()}
        for way, r in results.items():
            written = " / ".join(f"{b / 2**20:.2f}" for b in r["bytes"])
            print(f"{way:<30}{written:<28}{median[way]['save']:<18.3f}{median[way]['load']:<16.3f}")
        with_sums, without = median["trainer's (checksums)"], median["trainer's, no checksums"]
        both = sum(with_sums.values()) / sum(without.values())
        print(f"checksums cost: save {with_sums['save'] / without['save']:.3f}x, resume (load) "
              f"{with_sums['load'] / without['load']:.3f}x, both {both:.3f}x")
        shutil.rmtree(root[0], ignore_errors=True)
    destroy()


if __name__ == "__main__":
    main()

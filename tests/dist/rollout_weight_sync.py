"""Two trainer ranks push an HF checkpoint to a rollout server: over the broadcast group, or colocated.

``--mode distributed``: each rank holds half the rows of every tensor of ``--hf-dir`` (as a tensor-parallel shard
would); the halves are gathered to rank 0 with plain torch.distributed while rank 0 streams the full tensors, bucket
by bucket, through ``RolloutEngine.update_weights`` — all while torchrun's default group is alive and used around
it. The server is the one at ``--url`` (backend=external), or, with ``--start-from DIR``, an embedded server rank 0
starts itself from DIR, as the trainer does; then rank 0 also reports what the server generates afterwards.

``--mode tensor`` (colocated, needs ``--start-from``): rank 0 starts the embedded server as a TP-2 server, every rank
all-gathers the full tensors and hands its own copy through ``/update_weights_from_tensor`` (rank 0 via
``update_weights``, rank 1 via ``push_colocated``). The first push hands rank 1's server rank the tensors of
``--rank1-first`` instead (so the server holds each rank's rows from another checkpoint); rank 0 reports the greedy
generations after it, and after the second push (both ranks ``--hf-dir``) the usual generations.

Rank 0 writes what it sent (and saw) to ``--out``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_sapo.rollout import RolloutConfig, RolloutEngine
from megatron_sapo.rollout.hf_weights import iter_safetensors
from megatron_sapo.rollout.weight_sync import push_colocated

PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]]


def sharded_checkpoint(hf_dir: str, rank: int, world: int) -> list[tuple[str, torch.Tensor]]:
    shards = []
    for name, tensor in iter_safetensors(hf_dir):
        if tensor.shape[0] % world:
            raise SystemExit(f"{name}: {tensor.shape[0]} rows do not split over {world} ranks")
        shards.append((name, tensor.chunk(world, dim=0)[rank].clone()))
    return shards


def gathered(shards, rank: int, world: int):
    """Collective: every rank iterates; rank 0 gets the full tensors, in checkpoint order."""
    for name, shard in shards:
        parts = [torch.empty_like(shard) for _ in range(world)] if rank == 0 else None
        dist.gather(shard, parts, dst=0)
        if rank == 0:
            yield name, torch.cat(parts, dim=0)


def gathered_everywhere(shards, world: int):
    """Collective: every rank gets every full tensor (what export_hf_weights(all_ranks=True) gives)."""
    for name, shard in shards:
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)
        yield name, torch.cat(parts, dim=0)


def generations(engine):
    """The same calls as tests/test_rollout_weights.py's ``generations``."""
    greedy = engine.generate(PROMPTS, n=1, sampling=engine.sampling_params(temperature=0.0, ignore_eos=True))
    seeded = engine.generate(PROMPTS, n=3, seed=5, sampling=engine.sampling_params(temperature=1.0))
    return [s for group in greedy + seeded for s in group]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("distributed", "tensor"), default="distributed")
    parser.add_argument("--url")
    parser.add_argument("--api-key", help="the --url server's API key")
    parser.add_argument("--start-from", help="start an embedded server from this checkpoint instead of --url")
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--rank1-first", help="tensor mode: rank 1's checkpoint in the first push")
    parser.add_argument("--bucket-kb", type=float, default=64)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = sharded_checkpoint(args.hf_dir, rank, world)
    result = {"world_size": world, "pushes": []}
    engine = None
    common = dict(weight_sync="auto", bucket_size_mb=args.bucket_kb / 1024, weight_sync_timeout_s=120,
                  max_new_tokens=12)  # fmt: skip
    if rank == 0:
        if args.start_from:
            tp = world if args.mode == "tensor" else 1
            engine = RolloutEngine(RolloutConfig(backend="embedded", tp_size=tp, **common), model_path=args.start_from,
                                   eos_token_id=5)  # fmt: skip
        else:
            engine = RolloutEngine(RolloutConfig(backend="external", urls=[args.url], api_key=args.api_key, **common), model_path=args.hf_dir)
        result["mode"] = engine.weight_sync_mode
    for push in range(2):  # the second push reuses the group formed by the first
        if args.mode == "tensor":
            source = shards
            if push == 0 and rank == 1:
                source = sharded_checkpoint(args.rank1_first, rank, world)
            tensors = gathered_everywhere(source, world)
            if rank == 0:
                stats = engine.update_weights(tensors, weight_version=f"torchrun-{push}")
            else:
                stats = push_colocated(tensors, int(args.bucket_kb * 1024))
            if push == 0 and rank == 0:
                greedy = engine.generate(PROMPTS, n=1, sampling=engine.sampling_params(temperature=0.0,
                                                                                       ignore_eos=True))  # fmt: skip
                result["first_greedy"] = [g[0].response_ids for g in greedy]
        elif rank == 0:
            stats = engine.update_weights(gathered(shards, rank, world), weight_version=f"torchrun-{push}")
        else:
            for _ in gathered(shards, rank, world):
                pass
            stats = None
        if rank == 0:
            result["pushes"].append({"tensors": stats.tensors, "buckets": stats.buckets, "bytes": stats.bytes})
        # The default group still works alongside the weight-update group.
        check = torch.tensor([float(rank + 1)])
        dist.all_reduce(check)
        result.setdefault("default_group_sums", []).append(check.item())
    if rank == 0:
        if args.start_from:
            result["generations"] = [[s.response_ids, s.logprobs, s.weight_version] for s in generations(engine)]
        engine.shutdown()
        result["ranks_per_server"] = engine.ranks_per_server
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Two trainer ranks push an HF checkpoint to a rollout server over the broadcast group.

Each rank holds half the rows of every tensor of ``--hf-dir`` (as a tensor-parallel shard would); the halves are
gathered to rank 0 with plain torch.distributed while rank 0 streams the full tensors, bucket by bucket, through
``RolloutEngine.update_weights`` (weight_sync=distributed) — all while torchrun's default group is alive and used
around it. The server is the one at ``--url`` (backend=external), or, with ``--start-from DIR``, an embedded server
rank 0 starts itself from DIR, as the trainer does; then rank 0 also reports what the server generates afterwards.
Rank 0 writes what it sent (and saw) to ``--out``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_sapo.rollout import RolloutConfig, RolloutEngine
from megatron_sapo.rollout.hf_weights import iter_safetensors


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


def generations(engine):
    """The same calls as tests/test_rollout_weights.py's ``generations``."""
    prompts = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]]
    greedy = engine.generate(prompts, n=1, sampling=engine.sampling_params(temperature=0.0, ignore_eos=True))
    seeded = engine.generate(prompts, n=3, seed=5, sampling=engine.sampling_params(temperature=1.0))
    return [s for group in greedy + seeded for s in group]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--url")
    parser.add_argument("--start-from", help="start an embedded server from this checkpoint instead of --url")
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--bucket-kb", type=float, default=64)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = sharded_checkpoint(args.hf_dir, rank, world)
    result = {"world_size": world, "pushes": []}
    engine = None
    if rank == 0:
        common = dict(weight_sync="distributed", bucket_size_mb=args.bucket_kb / 1024, weight_sync_timeout_s=120,
                      max_new_tokens=12)  # fmt: skip
        if args.start_from:
            engine = RolloutEngine(RolloutConfig(backend="embedded", **common), model_path=args.start_from,
                                   eos_token_id=5)  # fmt: skip
        else:
            engine = RolloutEngine(RolloutConfig(backend="external", urls=[args.url], **common), model_path=args.hf_dir)
    for push in range(2):  # the second push reuses the group formed by the first
        if rank == 0:
            stats = engine.update_weights(gathered(shards, rank, world), weight_version=f"torchrun-{push}")
            result["pushes"].append({"tensors": stats.tensors, "buckets": stats.buckets, "bytes": stats.bytes})
        else:
            for _ in gathered(shards, rank, world):
                pass
        # The default group still works alongside the weight-update group.
        check = torch.tensor([float(rank + 1)])
        dist.all_reduce(check)
        result.setdefault("default_group_sums", []).append(check.item())
    if rank == 0:
        if args.start_from:
            result["generations"] = [[s.response_ids, s.logprobs] for s in generations(engine)]
        engine.shutdown()
        result["ranks_per_server"] = engine.ranks_per_server
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""vocab_parallel_log_probs on TP-sharded logits: every rank computes on its shard, rank 0 writes inputs and outputs.

The pytest side (tests/test_loss_logprobs.py) recomputes the reference with a single-process fp64 log_softmax over
the full vocabulary from the inputs written here, so this script holds no reference of its own.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megatron_sapo.loss import vocab_parallel_log_probs

# name -> (dtype, padded vocab, vocab_size, temperature, chunk_size, return_entropy); tokens are [2, 3].
CASES = {
    "full_vocab": (torch.float64, 16, 16, 1.0, None, True),
    "padded_chunked": (torch.float64, 18, 15, 0.7, 4, True),
    "padded_no_entropy": (torch.float64, 18, 13, 1.3, 3, False),
    "shard_all_padding": (torch.float64, 12, 5, 1.0, 2, True),
    "bf16_padded_chunked": (torch.bfloat16, 18, 15, 0.7, 4, True),
}


def run_case(dtype, padded_vocab, vocab_size, temperature, chunk_size, return_entropy, seed, group) -> dict:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(seed)
    full_logits = (4 * torch.randn(2, 3, padded_vocab, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab_size, (2, 3), generator=gen)
    grad_log_probs = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(2, 3, generator=gen, dtype=torch.float64)

    local_vocab = padded_vocab // world
    shard = full_logits[..., rank * local_vocab : (rank + 1) * local_vocab].clone().requires_grad_()
    out = vocab_parallel_log_probs(
        shard,
        targets,
        tp_group=group,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
    )
    log_probs, entropy = out if return_entropy else (out, None)
    objective = (log_probs.double() * grad_log_probs).sum()
    if return_entropy:
        objective = objective + (entropy.double() * grad_entropy).sum()
    objective.backward()

    shards = [torch.empty_like(shard.grad) for _ in range(world)]
    dist.all_gather(shards, shard.grad.contiguous(), group=group)
    return {
        "logits": full_logits.double().tolist(),
        "targets": targets.tolist(),
        "grad_log_probs": grad_log_probs.tolist(),
        "grad_entropy": grad_entropy.tolist() if return_entropy else None,
        "log_probs": log_probs.double().tolist(),
        "entropy": entropy.double().tolist() if return_entropy else None,
        "grad_logits": torch.cat(shards, dim=-1).double().tolist(),
        "log_probs_dtype": str(log_probs.dtype),
        "grad_dtype": str(shard.grad.dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = {
        name: {"vocab_size": case[2], "temperature": case[3], **run_case(*case, seed=i, group=dist.group.WORLD)}
        for i, (name, case) in enumerate(CASES.items())
    }
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Routing replay under one layout: Megatron replaying a random valid routing vs transformers forced to it.

    torchrun --nproc_per_node=N routing_replay.py --out JSON --hf-dir HF [--tp 2 --etp 2 --pp 1 --ep 1] [--recompute]

Reports the logits' max difference from transformers forced to the same routing (and from its natural routing),
which experts got gradients per MoE layer against which the routing used (two micro-batches, one sample each, so
that a recompute must replay the right one), and the routing the routers used (replayed, or recorded), gathered
back per sample.
"""

import argparse

import torch
import torch.distributed as dist
from common import finish
from transformers import AutoModelForCausalLM

from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.megatron_io import load_hf_weights
from megatron_sapo.convert.verify import verification_batch
from megatron_sapo.models import ModelOptions, build_model, load_arch
from megatron_sapo.models.routing_replay import RoutingReplay
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import initialize_model_parallel


def random_routing(arch, batch, seq, seed=7):
    """Per sample ``[seq, layers, top_k]``: distinct random experts, never expert ``(layer + 1) % E`` (so that one
    expert per layer must get no gradient)."""
    g = torch.Generator().manual_seed(seed)
    routing = torch.zeros(batch, seq, arch.num_layers, arch.num_experts_per_tok, dtype=torch.uint8)
    for layer in range(arch.num_layers):
        allowed = torch.tensor([e for e in range(arch.num_experts) if e != (layer + 1) % arch.num_experts])
        for b in range(batch):
            for t in range(seq):
                pick = torch.randperm(len(allowed), generator=g)[: arch.num_experts_per_tok]
                routing[b, t, layer] = allowed[pick]
    return [routing[b] for b in range(batch)]


@torch.no_grad()
def transformers_forward(model, input_ids, routing=None):
    """transformers' Qwen3-MoE logits and each gate's top-k (``[b, s, layers, k]``), with every gate's top-k
    replaced by ``routing`` (gate weights: the router's softmax at those experts, renormalised as norm_topk_prob
    says) or, with ``routing=None``, routed naturally."""
    tops, handles = [], []
    forced = torch.stack(routing) if routing is not None else None  # [b, s, layers, k]
    for index, layer in enumerate(model.model.layers):

        def hook(module, args, output, index=index):
            logits, weights, top = output
            if forced is not None:
                top = forced[:, :, index].reshape(-1, forced.shape[-1]).long()
                weights = torch.softmax(logits.float(), dim=-1).gather(1, top)
                if module.norm_topk_prob:
                    weights = weights / weights.sum(-1, keepdim=True)
            tops.append(top)
            return logits, weights.to(logits.dtype), top

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    logits = model(input_ids=input_ids).logits.float()
    for handle in handles:
        handle.remove()
    return logits, torch.stack(tops, dim=1).view(*input_ids.shape, len(tops), -1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--recompute", action="store_true")
    args = parser.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    arch = load_arch(args.hf_dir)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    initialize_model_parallel(layout, arch=arch)
    options = ModelOptions(moe_enable_routing_replay=True, recompute_granularity="full" if args.recompute else None)
    chunks = build_model(arch, layout, options)
    load_hf_weights(chunks, HFCheckpointReader(args.hf_dir), arch, progress=False)
    replay = RoutingReplay(chunks)

    input_ids = verification_batch(arch)
    batch, seq = input_ids.shape
    routing = random_routing(arch, batch, seq)

    def run(micro_batches, forward_only, used=None, record=False):
        def forward_step(data_iterator, model):
            rows = next(data_iterator)
            if record:
                replay.record()
            else:
                replay.replay([routing[r] for r in rows], seq)
            ids = input_ids[rows]
            positions = torch.arange(seq).expand(len(rows), seq)
            output = model(input_ids=ids, position_ids=positions, attention_mask=None)
            if used is not None:
                used.append((rows, replay.recorded(len(rows), seq)))
            replay.replay_recompute_after(output)

            def loss(output):
                return output.float().square().mean(), {"logits": output.detach()}

            return output, loss

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=chunks,
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=len(micro_batches[0]),
            forward_only=forward_only,
        )  # fmt: skip
        replay.stop()
        return outputs

    result = {"num_routers": len(replay.routers)}
    for chunk in chunks:
        chunk.eval()
    used = []
    outputs = run([list(range(batch))], forward_only=True, used=used)
    # What the routers used, gathered per sample over stages, SP and DP: the replayed routing, token for token.
    moe_layers = [i for i, moe in enumerate(arch.moe_layer_pattern) if moe]
    # Every data-parallel rank ran the whole batch here; in the actor each runs its own share, so only one reports.
    mine = lambda used: used if ps.get_data_parallel_rank() == 0 else []  # noqa: E731
    gathered = replay.gather_per_sample(mine(used), [seq] * batch, arch.num_layers)
    result["replayed_gathered_equal"] = all(
        torch.equal(g[:, moe_layers].long(), r[:, moe_layers].long()) for g, r in zip(gathered, routing)
    )
    lengths = [seq] * batch
    result["replayed_agreement"] = replay.agreement(mine(used), routing, lengths)
    # Recording (R2, router agreement): the natural top-k sets equal transformers' own.
    used = []
    run([[0], [1]], forward_only=True, used=used, record=True)
    recorded = replay.gather_per_sample(mine(used), [seq] * batch, arch.num_layers)
    hf_model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    natural_logits, natural = transformers_forward(hf_model, input_ids)
    result["natural_vs_random_agreement"] = replay.agreement(mine(used), routing, lengths)
    result["natural_vs_transformers_agreement"] = replay.agreement(mine(used), [n.to(torch.uint8) for n in natural],
                                                                   lengths)  # fmt: skip
    result["recorded_topk_mismatches"] = sum(
        int((rec[:, layer].long().sort(-1).values != nat[:, layer].sort(-1).values).any(-1).sum())
        for rec, nat in zip(recorded, natural) for layer in moe_layers
    )  # fmt: skip
    diff = torch.zeros(2)
    if ps.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(outputs[0]["logits"]).float()[..., : arch.vocab_size]
        forced, _ = transformers_forward(hf_model, input_ids, routing)
        diff = torch.tensor([(logits - forced).abs().max().item(), (logits - natural_logits).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    result["forced_max_abs_diff"], result["natural_max_abs_diff"] = diff.tolist()

    # Gradients: two micro-batches of one sample each; only the experts the routing uses may get any.
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad()
    run([[0], [1]], forward_only=False)
    wrong, used_counts = [], []
    for chunk in chunks:
        for module in chunk.modules():
            if not hasattr(module, "local_expert_indices") or not hasattr(module, "experts"):
                continue
            layer = module.layer_number - 1
            used = set(torch.stack(routing)[:, :, layer].flatten().tolist())
            used_counts.append(len(used))
            for local, expert in zip(module.experts.local_experts, module.local_expert_indices):
                has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in local.parameters())
                if has_grad != (expert in used):
                    wrong.append([layer, expert, has_grad])
            if module.router.weight.grad is None or module.router.weight.grad.abs().sum() == 0:
                wrong.append([layer, "router", False])
    position = f"{ps.get_pipeline_model_parallel_rank()}.{ps.get_tensor_model_parallel_rank()}."
    grads = {position + name: p.grad.double().square().sum().item()
             for chunk in chunks for name, p in chunk.named_parameters() if p.grad is not None}  # fmt: skip
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (wrong, used_counts, grads))
    result["wrong_gradients"] = [w for part in gathered for w in part[0]]
    result["used_experts_per_layer"] = [c for part in gathered for c in part[1]]
    result["grad_square_sums"] = {k: v for part in gathered for k, v in part[2].items()}
    finish(args.out, result)


if __name__ == "__main__":
    main()

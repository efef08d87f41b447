"""One Adam step with Megatron's DDP + distributed optimizer on the tiny model, next to a transformers reference.

    torchrun --nproc_per_node=N adam_step.py --out JSON --hf-dir HF [--tp 2 | --ep 2 ...]

The loss is the mean next-token cross-entropy over a fixed batch (the vocab-parallel logits are gathered and the
padding columns dropped, so it is exactly transformers' loss). Data-parallel ranks each take an equal share of
the rows. Rank 0 repeats the step with transformers + torch.optim.Adam on the whole batch and reports the
differences in gradient norm and in every updated weight.
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F
from common import finish

from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.megatron_io import export_hf_weights, load_hf_weights
from megatron_sapo.models import ModelOptions, build_model, load_arch
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import initialize_model_parallel, is_rank0

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-6


def batch(arch):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, arch.vocab_size, (4, 24), generator=generator)


def reference_step(hf_dir, input_ids):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = model(input_ids=input_ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()
    torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS).step()
    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the hub (per-expert) names
        model.save_pretrained(tmp)
        return loss.item(), grad_norm, load_file(f"{tmp}/model.safetensors")


def main():
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    args = parser.parse_args()

    arch = load_arch(args.hf_dir)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    initialize_model_parallel(layout, arch=arch)
    chunks = build_model(arch, layout, ModelOptions())
    load_hf_weights(chunks, HFCheckpointReader(args.hf_dir), arch, progress=False)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk) for chunk in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
                        weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=True),  # fmt: skip
        model,
    )

    input_ids = batch(arch)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    local_ids = input_ids.chunk(dp_size)[dp_rank]
    position_ids = torch.arange(local_ids.shape[1]).expand_as(local_ids)

    def forward_step(data_iterator, chunk):
        logits = chunk(input_ids=local_ids, position_ids=position_ids, attention_mask=None)

        def loss_func(output):
            full = gather_from_tensor_model_parallel_region(output)[..., : arch.vocab_size]
            loss = F.cross_entropy(full[:, :-1].reshape(-1, arch.vocab_size), local_ids[:, 1:].reshape(-1))
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=model,
        num_microbatches=1,
        seq_length=local_ids.shape[1],
        micro_batch_size=local_ids.shape[0],
        forward_only=False,
    )
    success, grad_norm, _ = optimizer.step()

    updated = dict(export_hf_weights(model, arch))
    result = None
    if is_rank0():
        ref_loss, ref_grad_norm, ref_weights = reference_step(args.hf_dir, input_ids)
        moved = max((ref_weights[n] - HFCheckpointReader(args.hf_dir).get(n)).abs().max().item() for n in ref_weights)
        result = {
            "step_succeeded": bool(success),
            "data_parallel_size": dp_size,
            "grad_norm": grad_norm,
            "reference_grad_norm": ref_grad_norm,
            "max_abs_weight_diff": max((updated[n] - ref_weights[n]).abs().max().item() for n in ref_weights),
            "max_abs_weight_change": moved,
            "names_equal": set(updated) == set(ref_weights),
        }
    finish(args.out, result)


if __name__ == "__main__":
    main()

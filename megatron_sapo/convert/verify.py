"""Check a Megatron model against transformers: same input ids, full-vocabulary logits compared on rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sapo.models.arch import ModelArch


@torch.no_grad()
def megatron_logits(chunks: list[torch.nn.Module], input_ids: torch.Tensor, arch: ModelArch) -> torch.Tensor | None:
    """Collective: logits ``[batch, seq, vocab]`` (fp32, padding columns dropped) on global rank 0, else None.

    Runs Megatron's pipeline schedule, so any PP layout works; the last stage gathers the vocab-parallel
    logits over TP and its first rank sends them to rank 0.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(chunks[0].parameters()).device
    input_ids = input_ids.to(device)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=device).expand(batch, seq)

    def forward_step(data_iterator, model):
        logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
        return logits, lambda output: (output.sum() * 0, {"logits": output})

    for chunk in chunks:
        chunk.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=chunks,
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    logits = None
    if ps.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(outputs[0]["logits"]).float()[..., : arch.vocab_size]
    # The first data-parallel replica's TP rank 0 of the last stage owns the result; rank 0 reports it.
    owner = int(ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank(with_context_parallel=True) == 0)  # fmt: skip
    owners = [0] * dist.get_world_size()
    dist.all_gather_object(owners, owner)
    src = owners.index(1)
    if src == 0:
        return logits if dist.get_rank() == 0 else None
    if dist.get_rank() == src:
        dist.send(logits.contiguous(), dst=0)
    elif dist.get_rank() == 0:
        logits = torch.empty(batch, seq, arch.vocab_size, device=device)
        dist.recv(logits, src=src)
        return logits
    return None


@torch.no_grad()
def transformers_logits(hf_dir: str, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the converter's own bar is the one that tracks progress
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()
    return model(input_ids=input_ids.cpu()).logits.float()


def verification_batch(arch: ModelArch, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of token ids (seq a multiple of 8, as sequence parallelism with TP ≤ 8 needs)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, arch.vocab_size, (batch, seq), generator=generator)

"""MoE routing replay (R2/R3) on megatron-core 0.16's ``RouterReplay``, and the routing format SGLang returns.

Routing of a sample is an integer tensor ``[positions, num_hidden_layers, top_k]``: the experts each layer chose
for the token at each position (dense layers' rows are unused), SGLang's ``meta_info.routed_experts`` layout
(``srt/state_capturer/routed_experts.py``: positions ``[start, seq_len - 1)``, since the last sampled token is never
fed through the model). Positions it does not cover (the last token, padding) get an arbitrary valid routing: causal
attention keeps them from touching the response's log-probs.

megatron-core's ``TopKRouter`` owns one ``RouterReplay`` per MoE layer when ``moe_enable_routing_replay`` is set.
Its actions: ``RECORD`` (route naturally, keep the top-k), ``REPLAY_FORWARD`` (use the target top-k; the gate
probabilities are the router's own scores gathered at those experts, so the router still gets gradients) and
``REPLAY_BACKWARD`` (pop targets first-in first-out, for activation recompute in the backward pass). Nothing in
megatron-core switches between them; :class:`RoutingReplay` does, per micro-batch, for this rank's routers only
(its own list, not megatron-core's process-wide one, which also holds a reference model's routers).

Token order: a router sees the hidden states ``[seq, batch, hidden]`` flattened sequence-major; with sequence
parallelism each TP rank holds a contiguous ``seq / tp`` slice of it.
"""

from __future__ import annotations

import base64

import numpy as np
import torch


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds expert ids (the routing of a batch is large: tokens × layers × top-k)."""
    return torch.uint8 if num_experts <= 256 else torch.int32


def decode_routed_experts(encoded: str, num_layers: int, top_k: int) -> torch.Tensor:
    """SGLang's ``meta_info.routed_experts``: base64 of little-endian int32 ``[tokens, num_layers, top_k]``."""
    flat = np.frombuffer(base64.b64decode(encoded), dtype="<i4")
    if flat.size % (num_layers * top_k):
        raise ValueError(f"routed_experts: {flat.size} ids do not fill [tokens, {num_layers}, {top_k}]")
    return torch.from_numpy(flat.astype(np.int32).reshape(-1, num_layers, top_k))


def encode_routed_experts(routing: torch.Tensor) -> str:
    """The inverse of :func:`decode_routed_experts` (what SGLang's detokenizer sends)."""
    return base64.b64encode(routing.to(torch.int32).numpy().astype("<i4").tobytes()).decode("ascii")


def filler_routing(num_tokens: int, top_k: int, num_experts: int) -> torch.Tensor:
    """A valid ``[num_tokens, top_k]`` routing for positions without one: distinct experts, spread evenly."""
    return (torch.arange(num_tokens)[:, None] * top_k + torch.arange(top_k)[None, :]) % num_experts


def agreement_counts(used: torch.Tensor, reference: torch.Tensor) -> tuple[int, int]:
    """``(agreeing, total)`` over the positions both cover: (token, layer) pairs whose top-k *sets* are equal.
    ``used`` and ``reference`` are ``[positions, layers, top_k]`` of one sample, restricted to the layers to count."""
    n = min(used.shape[0], reference.shape[0])
    a, b = used[:n].long().sort(-1).values, reference[:n].long().sort(-1).values
    return int((a == b).all(-1).sum()), n * a.shape[1]


class RoutingReplay:
    """This rank's routers and their replay actions, driven per micro-batch by the actor."""

    def __init__(self, chunks: list[torch.nn.Module]):
        from megatron.core.transformer.moe.router import TopKRouter

        self.config = chunks[0].config  # a pipeline stage of dense layers only has no routers, but takes part
        self.top_k, self.num_experts = self.config.moe_router_topk, self.config.num_moe_experts
        self.routers = []  # (0-based global layer index, RouterReplay)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter) and module.router_replay is not None:
                    self.routers.append((module.layer_number - 1, module.router_replay))

    def _action(self, action) -> None:
        for _, replay in self.routers:
            replay.set_router_replay_action(action)

    def record(self) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._action(RouterReplayAction.RECORD)

    def replay(self, routing: list[torch.Tensor], seq_len: int) -> None:
        """Replay ``routing`` (one ``[positions, layers, top_k]`` per sample of the micro-batch, padded to
        ``seq_len``) in the next forward; its recompute in the backward pass gets the same routing."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        batch = len(routing)
        sp = self.config.sequence_parallel
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        local = slice(tp_rank * seq_len // tp, (tp_rank + 1) * seq_len // tp) if sp else slice(None)
        device = self._device()
        for layer, replay in self.routers:
            full = filler_routing(seq_len * batch, self.top_k, self.num_experts).view(seq_len, batch, self.top_k)
            for row, sample in enumerate(routing):
                n = min(sample.shape[0], seq_len)
                full[:n, row] = sample[:n, layer].long()
            replay.set_target_indices(full[local].reshape(-1, self.top_k).to(device))
        self._action(RouterReplayAction.REPLAY_FORWARD)

    def recorded(self, batch: int, seq_len: int) -> dict[int, torch.Tensor]:
        """Layer index → ``[batch, seq_len, top_k]``: the top-k the last forward used (recorded, or replayed),
        gathered over SP."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        result = {}
        for layer, replay in self.routers:
            recording = replay.router_replay_action == RouterReplayAction.RECORD
            top = (replay.get_recorded_indices() if recording else replay.target_topk_idx).view(-1, batch, self.top_k)
            if self.config.sequence_parallel:
                parts = [torch.empty_like(top) for _ in range(ps.get_tensor_model_parallel_world_size())]
                torch.distributed.all_gather(parts, top.contiguous(), group=ps.get_tensor_model_parallel_group())
                top = torch.cat(parts)
            result[layer] = top[:seq_len].transpose(0, 1).to("cpu", routing_dtype(self.num_experts))
        return result

    def gather_per_sample(
        self, used: list[tuple[list[int], dict[int, torch.Tensor]]], lengths: list[int], num_layers: int
    ) -> list[torch.Tensor]:
        """Collective: every sample's ``[length, num_layers, top_k]`` routing on every rank, from each rank's
        ``(sample indices, recorded())`` per micro-batch. One TP rank per stage and data-parallel rank contributes;
        a sum over the world assembles the rest (dense layers stay 0)."""
        from megatron.core import parallel_state as ps

        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        dtype = routing_dtype(self.num_experts)  # one contributor per entry: the sum cannot overflow
        packed = torch.zeros(offsets[-1], num_layers, self.top_k, dtype=dtype, device=self._device())
        if ps.get_tensor_model_parallel_rank() == 0:
            for indices, layers in used:
                for row, i in enumerate(indices):
                    for layer, top in layers.items():
                        packed[offsets[i] : offsets[i + 1], layer] = top[row, : lengths[i]].to(packed)
        torch.distributed.all_reduce(packed)
        return [packed[offsets[i] : offsets[i + 1]].cpu() for i in range(len(lengths))]

    def agreement(self, used: list[tuple[list[int], dict[int, torch.Tensor]]], routings: list[torch.Tensor],
                  lengths: list[int]) -> float:  # fmt: skip
        """Collective: the fraction of (token, MoE layer) top-k sets of the forward passes in ``used`` (see
        :meth:`gather_per_sample`) that equal ``routings`` (the engine's, per sample), over every rank's samples and
        layers. Only two numbers cross ranks."""
        from megatron.core import parallel_state as ps

        counts = torch.zeros(2, dtype=torch.float64, device=self._device())
        if ps.get_tensor_model_parallel_rank() == 0:
            for indices, layers in used:
                order = sorted(layers)
                for row, i in enumerate(indices):
                    mine = torch.stack([layers[layer][row, : lengths[i]] for layer in order], dim=1)
                    agree, total = agreement_counts(mine, routings[i][:, order])
                    counts += torch.tensor([agree, total], dtype=torch.float64, device=counts.device)
        torch.distributed.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] else 1.0

    def replay_recompute_after(self, output: torch.Tensor) -> None:
        """Once the backward pass reaches ``output`` (this stage's output), recompute pops its routing in order."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if self.config.recompute_granularity == "full" and output.requires_grad:
            output.register_hook(lambda grad: self._action(RouterReplayAction.REPLAY_BACKWARD))

    def stop(self) -> None:
        """Route naturally again and drop every stored target and record."""
        for _, replay in self.routers:
            replay.clear_router_replay_action()
            replay.clear_indices()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

"""The embedded server's ``return_routed_experts``: the transformers routers' top-k of every token it ran, in
SGLang 0.5.23's reply format (``meta_info.routed_experts``, see ``models/routing_replay.py``).

SGLang records, per request, the experts of every position it fed through the model, ``[0, seq_len - 1)``: the
prompt and every sampled token but the last, and replies with positions ``[routed_experts_start_len, seq_len - 1)``.
Here a forward hook on each MoE layer's gate records the top-k of each forward of one ``decode_batch`` call: the
prefill of the left-padded prompts, then one decode step per sampled token.
"""

from __future__ import annotations

import torch

from megatron_sapo.models.routing_replay import encode_routed_experts


class RoutedExpertsCapture:
    """``with RoutedExpertsCapture(model) as capture: decode_batch(model, requests, ...)``, then
    ``capture.per_request(requests, results)``."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.gates = {i: layer.mlp.gate for i, layer in enumerate(self.layers) if hasattr(layer.mlp, "gate")}
        self.top_k = next(iter(self.gates.values())).top_k if self.gates else 0
        self.forwards: list[dict[int, torch.Tensor]] = []  # per forward: layer -> [tokens, top_k]
        self._handles = []

    def __enter__(self) -> "RoutedExpertsCapture":
        for index, gate in self.gates.items():
            self._handles.append(gate.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def record(module, args, output):
            if index == min(self.gates):  # the first MoE layer opens a new forward
                self.forwards.append({})
            self.forwards[-1][index] = output[2].detach().to("cpu", torch.int32)

        return record

    def per_request(self, prompt_lengths: list[int], output_lengths: list[int]) -> list[torch.Tensor]:
        """Per request ``[prompt + output - 1, num_layers, top_k]`` int32 (dense layers 0), as SGLang keeps it."""
        batch = len(prompt_lengths)
        width = max(prompt_lengths, default=0)
        routings = []
        for row, (prompt, output) in enumerate(zip(prompt_lengths, output_lengths)):
            positions = max(prompt + output - 1, 0)
            routing = torch.zeros(positions, len(self.layers), self.top_k, dtype=torch.int32)
            for step, forward in enumerate(self.forwards):
                for layer, top in forward.items():
                    top = top.view(batch, -1, self.top_k)[row]
                    if step == 0:  # the prefill: the prompt sits right-aligned in the padded batch
                        rows = top[width - prompt :][:positions]
                        routing[: len(rows), layer] = rows
                    elif prompt + step - 1 < positions:  # step s fed sampled token s - 1
                        routing[prompt + step - 1, layer] = top[0]
            routings.append(routing)
        return routings


def reply_routed_experts(routing: torch.Tensor, start_len: int) -> str:
    """``meta_info.routed_experts`` for positions ``[start_len, seq_len - 1)``."""
    return encode_routed_experts(routing[min(max(start_len, 0), routing.shape[0]) :])

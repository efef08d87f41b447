"""RMSNorm for the local (no Transformer Engine) layer spec.

Megatron-Core's local spec uses ``WrappedTorchNorm``, which refuses sequence parallelism. This norm does the
same math as Qwen3's HF ``RMSNorm`` (statistics in fp32, weight applied after casting back), and marks its weight
``sequence_parallel`` when its input is sequence-sharded, so that Megatron's ``finalize_model_grads``
all-reduces the weight gradient across the TP group exactly as it does for Transformer Engine's norms.
"""

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, for_qk: bool = False, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # q/k norms see whole sequences (after the QKV all-gather); Megatron reduces their grads by name.
        self.weight.sequence_parallel = config.sequence_parallel and not for_qk

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden = hidden_states.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


class QKRMSNorm(RMSNorm):
    """The q/k norm: a class rather than ``ModuleSpec(RMSNorm, params=...)`` because megatron-core 0.17+ calls
    the attention's ``q_layernorm``/``k_layernorm`` spec entries directly (``cls(hidden_size=, config=, eps=)``)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__(config, hidden_size, eps, for_qk=True, **kwargs)

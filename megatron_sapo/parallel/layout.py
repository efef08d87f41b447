"""Parallel layouts (TP, PP, CP, EP, ETP → DP) and their validation against a world size and a model.

Every rule Megatron-Core would otherwise trip over deep inside model construction (or, worse, silently get
wrong) is checked here first, and a violation is one line naming the setting and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sapo.errors import InputError


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel_size

    @property
    def sequence_parallel(self) -> bool:
        # Megatron requires sequence parallelism for MoE with TP > 1; it also saves activation memory, so
        # it is on whenever TP > 1.
        return self.tp > 1

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def megatron_kwargs(self) -> dict[str, int]:
        """The ``*_parallel_size`` keyword arguments of ``TransformerConfig``/``initialize_model_parallel``."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
        )


def validate_layout(
    layout: ParallelLayout, world_size: int, arch=None, *, prefix: str = "", te: bool = False, training: bool = True
):
    """Raise :class:`InputError` for the first rule ``layout`` breaks.

    ``arch`` (a ``ModelArch``) adds the model-shape rules; ``prefix`` is prepended to setting names so that
    messages name the key the user typed (``actor.megatron.`` in the trainer). ``training=False`` (conversion,
    inference) skips the rules that only gradients depend on.
    """

    def fail(message: str):
        raise InputError(message)

    def name(field: str) -> str:
        return prefix + field

    for field, value in layout.megatron_kwargs().items():
        if not isinstance(value, int) or value < 1:
            fail(f"{name(field)}={value!r}: must be a positive integer")
    tp, pp, cp, ep, etp = layout.tp, layout.pp, layout.cp, layout.ep, layout.etp
    if world_size % (tp * pp * cp):
        fail(
            f"{name('tensor_model_parallel_size')}×{name('pipeline_model_parallel_size')}×"
            f"{name('context_parallel_size')} = {tp}×{pp}×{cp} = {tp * pp * cp} does not divide the world size "
            f"{world_size}; choose sizes whose product divides the number of processes"
        )
    if world_size % (etp * ep * pp):
        fail(
            f"{name('expert_tensor_parallel_size')}×{name('expert_model_parallel_size')}×"
            f"{name('pipeline_model_parallel_size')} = {etp}×{ep}×{pp} = {etp * ep * pp} does not divide the "
            f"world size {world_size}; choose EP and ETP so that their product times PP divides it"
        )
    if cp > 1 and not te:
        fail(
            f"{name('context_parallel_size')}={cp}: context parallelism needs Transformer Engine attention "
            "(CUDA); set it to 1"
        )
    if arch is None:
        return
    if arch.num_attention_heads % tp:
        fail(
            f"{name('tensor_model_parallel_size')}={tp} does not divide num_attention_heads="
            f"{arch.num_attention_heads}; use a TP that divides it"
        )
    if arch.num_key_value_heads % tp:
        fail(
            f"{name('tensor_model_parallel_size')}={tp} does not divide num_key_value_heads="
            f"{arch.num_key_value_heads} (query groups); use TP ≤ {arch.num_key_value_heads} that divides it"
        )
    if arch.num_layers % pp:
        fail(
            f"{name('pipeline_model_parallel_size')}={pp} does not divide num_hidden_layers={arch.num_layers}; "
            "use a PP that divides the layer count"
        )
    if arch.padded_vocab_size % tp:
        fail(
            f"{name('tensor_model_parallel_size')}={tp} does not divide the padded vocabulary "
            f"{arch.padded_vocab_size}; use a power-of-two TP"
        )
    if any(arch.moe_layer_pattern):
        if arch.num_experts % ep:
            fail(
                f"{name('expert_model_parallel_size')}={ep} does not divide num_experts={arch.num_experts}; "
                "use an EP that divides the expert count"
            )
        if arch.moe_intermediate_size % etp:
            fail(
                f"{name('expert_tensor_parallel_size')}={etp} does not divide moe_intermediate_size="
                f"{arch.moe_intermediate_size}; use an ETP that divides it"
            )
        if training and ep == 1 and etp < tp:
            # With EP=1 megatron-core 0.16 marks expert weights as ordinary data-parallel weights, so the
            # gradients of expert replicas on different TP ranks (ETP < TP) are never summed.
            fail(
                f"{name('expert_tensor_parallel_size')}={etp} < {name('tensor_model_parallel_size')}={tp} with "
                f"{name('expert_model_parallel_size')}=1 trains wrong expert gradients in megatron-core; set "
                f"{name('expert_tensor_parallel_size')}={tp} or use expert parallelism (EP > 1)"
            )
    elif ep > 1 or etp > 1:
        fail(f"{name('expert_model_parallel_size')}={ep}: the model has no MoE layers; set EP and ETP to 1")
    if not all(arch.moe_layer_pattern) and arch.intermediate_size % tp:
        fail(
            f"{name('tensor_model_parallel_size')}={tp} does not divide intermediate_size="
            f"{arch.intermediate_size} of the dense MLP layers; use a TP that divides it"
        )

"""Layout validation: each rule gives one line naming the setting and the fix."""

import pytest

from megatron_sapo.errors import InputError
from megatron_sapo.models import load_arch
from megatron_sapo.parallel.layout import ParallelLayout, validate_layout


@pytest.fixture
def arch(tiny_hf_dir):
    return load_arch(tiny_hf_dir)  # 4 heads, 2 query groups, 4 layers, 4 experts, vocab 250


@pytest.mark.parametrize(
    "layout, world, needle",
    [
        (ParallelLayout(tensor_model_parallel_size=3), 3, "does not divide num_attention_heads=4"),
        (ParallelLayout(tensor_model_parallel_size=4), 4, "does not divide num_key_value_heads=2"),
        (ParallelLayout(pipeline_model_parallel_size=3), 3, "does not divide num_hidden_layers=4"),
        (ParallelLayout(expert_model_parallel_size=3), 3, "does not divide num_experts=4"),
        (ParallelLayout(tensor_model_parallel_size=2), 3, "does not divide the world size 3"),
        (ParallelLayout(expert_model_parallel_size=4), 2, "= 4 does not divide the world size 2"),
        (ParallelLayout(context_parallel_size=2), 2, "context parallelism needs Transformer Engine"),
        (ParallelLayout(tensor_model_parallel_size=0), 1, "must be a positive integer"),
        (
            ParallelLayout(tensor_model_parallel_size=2),
            2,
            "expert_tensor_parallel_size=1 < actor.megatron.tensor_model_parallel_size=2",
        ),
    ],
)
def test_bad_layouts_name_the_setting(arch, layout, world, needle):
    with pytest.raises(InputError) as error:
        validate_layout(layout, world, arch, prefix="actor.megatron.")
    message = str(error.value)
    assert needle in message and "\n" not in message
    assert "actor.megatron." in message


@pytest.mark.parametrize(
    "layout, world",
    [
        (ParallelLayout(), 1),
        (ParallelLayout(tensor_model_parallel_size=2, expert_tensor_parallel_size=2), 2),
        (ParallelLayout(expert_model_parallel_size=2), 2),
        (ParallelLayout(pipeline_model_parallel_size=2), 2),
        (ParallelLayout(tensor_model_parallel_size=2, expert_model_parallel_size=2), 4),
    ],
)
def test_good_layouts_pass(arch, layout, world):
    validate_layout(layout, world, arch)
    assert layout.data_parallel_size(world) * layout.tp * layout.pp == world
    assert layout.sequence_parallel == (layout.tp > 1)


def test_inference_allows_expert_replicas_across_tp(arch):
    validate_layout(ParallelLayout(tensor_model_parallel_size=2), 2, arch, training=False)

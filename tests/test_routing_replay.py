"""Routing replay on megatron-core's RouterReplay: Megatron replaying a random valid routing gives the logits of
transformers forced to that routing (1 process, TP=2+SP, EP=2, PP=2, PP=2 with full recompute), and only the
replayed experts get gradients; recompute replays each micro-batch's own routing; SGLang's routed_experts format
round-trips. (~70 s of CPU: five torchrun runs of the tiny model)"""

import base64

import numpy as np
import pytest
import torch
from torchrun import torchrun

from megatron_sapo.models.routing_replay import agreement_counts, decode_routed_experts, encode_routed_experts

TOLERANCE = 1e-4


LAYOUTS = {
    "single": ([], 1),
    "tp2_sp": (["--tp", "2", "--etp", "2"], 2),
    "ep2": (["--ep", "2"], 2),
    "pp2": (["--pp", "2"], 2),
    "pp2_recompute": (["--pp", "2", "--recompute"], 2),
}
_results: dict[str, dict] = {}


def _run(tiny_hf_dir, name):
    if name not in _results:
        layout, nproc = LAYOUTS[name]
        _results[name] = torchrun("routing_replay.py", "--hf-dir", tiny_hf_dir, *layout, nproc=nproc)
    return _results[name]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_replayed_routing_matches_forced_transformers(tiny_hf_dir, name):
    result = _run(tiny_hf_dir, name)
    assert result["num_routers"] >= 2
    assert result["forced_max_abs_diff"] <= TOLERANCE
    # Gathered back per sample (over stages, SP, DP), the routing the routers used is the replayed one, and in
    # record mode (R2, router agreement) it is transformers' natural top-k.
    assert result["replayed_gathered_equal"] is True
    assert result["recorded_topk_mismatches"] == 0
    # rollout/router_agreement's collective count: 1 against itself, 1 natural vs transformers' natural, and about
    # chance level (1/C(4,2) per layer, expert excluded: 1/3) natural vs the random routing.
    assert result["replayed_agreement"] == result["natural_vs_transformers_agreement"] == 1.0
    assert 0.1 < result["natural_vs_random_agreement"] < 0.6
    # The random routing is not the natural one: without replay the logits would be far off.
    assert result["natural_max_abs_diff"] > 100 * TOLERANCE
    # Every MoE layer's routing leaves one expert out: that expert, and only it, gets no gradient.
    assert result["wrong_gradients"] == []
    assert result["used_experts_per_layer"] and set(result["used_experts_per_layer"]) == {3}


def test_recompute_replays_each_micro_batch_its_own_routing(tiny_hf_dir):
    """Full recompute under PP=2 with two micro-batches of different routings: 1F1B runs the second forward before
    the first backward, so the recompute must pop the first micro-batch's routing (REPLAY_BACKWARD), not reuse the
    latest target. The gradients equal those without recompute."""
    plain = _run(tiny_hf_dir, "pp2")["grad_square_sums"]
    recomputed = _run(tiny_hf_dir, "pp2_recompute")["grad_square_sums"]
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name, value in plain.items():
        assert recomputed[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_sglang_routed_experts_format():
    """base64 of little-endian int32 [tokens, layers, top_k], decoded as sglang's own helper does (np.frombuffer)."""
    routing = torch.randint(0, 128, (5, 3, 8), dtype=torch.int32)
    encoded = encode_routed_experts(routing)
    assert np.array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<i4"), routing.flatten().numpy())
    assert torch.equal(decode_routed_experts(encoded, 3, 8), routing)
    with pytest.raises(ValueError, match="routed_experts"):
        decode_routed_experts(encoded, 4, 8)


def test_agreement_counts_topk_sets_per_token_and_layer():
    a = torch.tensor([[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]])  # [tokens=3, layers=2, k=2]
    b = a.clone()
    b[0, 0] = torch.tensor([1, 0])  # same set, other order: agrees
    b[1, 1] = torch.tensor([0, 2])  # differs
    b = b[:2]  # b covers fewer positions: only the common ones count
    assert agreement_counts(a, b) == (3, 4)
    assert agreement_counts(a[:, :1], b[:, :1]) == (2, 2)

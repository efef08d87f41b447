"""The trainer's weight sync from a Megatron model: every rank holds a layout's shards of ``--hf-dir``, rank 0
starts an embedded server from ``--start-from`` and streams ``export_hf_weights`` to it (``weight_sync=auto``: a
broadcast group for an embedded server of one rank), as ``trainer._sync_weights`` does. Rank 0 reports the names
sent and what the server generates before, after, and after reloading ``--hf-dir``'s own tensors from disk (which
tests/test_rollout_weights.py shows to generate as a fresh server does).
"""

from __future__ import annotations

import argparse

from common import finish
from rollout_weight_sync import generations

from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.megatron_io import export_hf_weights, load_hf_weights
from megatron_sapo.models import ModelOptions, build_model, load_arch
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import initialize_model_parallel, is_rank0
from megatron_sapo.rollout import RolloutConfig, RolloutEngine
from megatron_sapo.rollout.hf_weights import iter_safetensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--start-from", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    arch = load_arch(args.hf_dir)
    layout = ParallelLayout(args.tp, args.pp, 1, 1, 1)
    initialize_model_parallel(layout, arch=arch, training=False)
    chunks = build_model(arch, layout, ModelOptions())
    load_hf_weights(chunks, HFCheckpointReader(args.hf_dir), arch, progress=False)
    result, engine = {}, None
    if is_rank0():
        config = RolloutConfig(backend="embedded", weight_sync="auto", bucket_size_mb=64 / 1024, max_new_tokens=12)
        engine = RolloutEngine(config, model_path=args.start_from, eos_token_id=5)
        result["mode"] = engine.weight_sync_mode
        result["before"] = [[s.response_ids, s.logprobs, s.weight_version] for s in generations(engine)]
    names = []

    def named_tensors():
        for name, tensor in export_hf_weights(chunks, arch):
            names.append(name)
            yield name, tensor

    if is_rank0():
        stats = engine.update_weights(named_tensors(), weight_version="megatron-1")
        result.update(tensors=stats.tensors, names=names)
        result["generations"] = [[s.response_ids, s.logprobs, s.weight_version] for s in generations(engine)]
        engine.update_weights(iter_safetensors(args.hf_dir), weight_version="disk")
        result["from_disk"] = [[s.response_ids, s.logprobs, s.weight_version] for s in generations(engine)]
        engine.shutdown()
    else:
        for _ in named_tensors():
            pass
    finish(args.out, result)


if __name__ == "__main__":
    main()

"""One layout: load the tiny model (from HF or from a Megatron checkpoint), compare with transformers, export.

    torchrun --nproc_per_node=N model_layouts.py --out JSON --hf-dir HF [--tp 2 --pp 1 --ep 1 --etp 1]
        [--load-ckpt DIR] [--save-ckpt DIR] [--export]
"""

import argparse
import json

import torch

from megatron_sapo.checkpoint import load_sharded, save_sharded
from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.megatron_io import export_hf_weights, load_hf_weights
from megatron_sapo.convert.verify import megatron_logits, transformers_logits, verification_batch
from megatron_sapo.models.qwen3_moe import ModelOptions, Qwen3MoeArch, build_model
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True)
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--load-ckpt")
    parser.add_argument("--save-ckpt")
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()

    arch = Qwen3MoeArch.from_hf_dir(args.hf_dir)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    initialize_model_parallel(layout, arch=arch, training=False)
    chunks = build_model(arch, layout, ModelOptions())
    reader = HFCheckpointReader(args.hf_dir)
    if args.load_ckpt:
        sharded = {"model": chunks[0].sharded_state_dict()}
        chunks[0].load_state_dict(load_sharded(sharded, args.load_ckpt)["model"])
    else:
        load_hf_weights(chunks, reader, arch, progress=False)

    result = {"sequence_parallel": chunks[0].config.sequence_parallel}
    input_ids = verification_batch(arch)
    logits = megatron_logits(chunks, input_ids, arch)
    if is_rank0():
        reference = transformers_logits(args.hf_dir, input_ids)
        result["logits_max_abs_diff"] = (logits - reference).abs().max().item()
        result["logits_shape"] = list(logits.shape)
        result["reference_logits_std"] = reference.std().item()

    if args.export:
        exported = {}
        for name, tensor in export_hf_weights(chunks, arch):
            exported[name] = tensor
        if is_rank0():
            original = {name: reader.get(name) for name in reader.names()}
            result["export_names_equal"] = set(exported) == set(original)
            result["export_not_bitwise_equal"] = [
                name for name in original
                if name not in exported or exported[name].dtype != original[name].dtype
                or not torch.equal(exported[name], original[name])
            ]  # fmt: skip
            result["export_count"] = len(exported)

    if args.save_ckpt:
        save_sharded({"model": chunks[0].sharded_state_dict()}, args.save_ckpt)
    if is_rank0():
        with open(args.out, "w") as f:
            json.dump(result, f)
    destroy()


if __name__ == "__main__":
    main()

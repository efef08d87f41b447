"""Load tiny models (from HF or from a Megatron checkpoint) under layouts, compare with transformers, export.

    torchrun --nproc_per_node=N model_layouts.py --out JSON --hf-dir HF [--tp 2 --pp 1 --ep 1 --etp 1]
        [--load-ckpt DIR] [--save-ckpt DIR] [--export]

One case: the flat result below. ``--sweep tp2 pp2 ...`` (with ``--hf-dir`` repeated and ``--export``) runs every
(model, layout) case in this one process group instead (a layout is ``tp2``, ``pp2``, ``tp2pp1``...): each loads the
HF weights, compares logits and exports; each model's first layout also saves a Megatron checkpoint that every later
layout of it then loads into zeroed parameters (``ckpt_logits_max_abs_diff``). The result is keyed
``"<model_type>/<layout>"``.
"""

import argparse
import os
import re
import tempfile

import torch
from common import finish

from megatron_sapo.checkpoint import load_sharded, save_sharded
from megatron_sapo.convert.hf_io import HFCheckpointReader
from megatron_sapo.convert.megatron_io import export_hf_weights, load_hf_weights
from megatron_sapo.convert.verify import megatron_logits, transformers_logits, verification_batch
from megatron_sapo.models import ModelOptions, build_model, load_arch
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.parallel.state import init_distributed, initialize_model_parallel, is_rank0


def build(hf_dir: str, layout: ParallelLayout):
    arch = load_arch(hf_dir)
    initialize_model_parallel(layout, arch=arch, training=False)
    return arch, build_model(arch, layout, ModelOptions())


def compare(chunks, arch, hf_dir: str, result: dict, key: str = "logits_max_abs_diff") -> None:
    input_ids = verification_batch(arch)
    logits = megatron_logits(chunks, input_ids, arch)
    if is_rank0():
        reference = transformers_logits(hf_dir, input_ids)
        result[key] = (logits - reference).abs().max().item()
        result["logits_shape"] = list(logits.shape)
        result["reference_logits_std"] = reference.std().item()


def export(chunks, arch, reader: HFCheckpointReader, result: dict) -> None:
    exported = dict(export_hf_weights(chunks, arch))
    if is_rank0():
        original = {name: reader.get(name) for name in reader.names()}
        result["export_names_equal"] = set(exported) == set(original)
        result["export_not_bitwise_equal"] = [
            name for name in original
            if name not in exported or exported[name].dtype != original[name].dtype
            or not torch.equal(exported[name], original[name])
        ]  # fmt: skip
        result["export_count"] = len(exported)


def sweep(hf_dirs: list[str], layouts: list[str]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        init_distributed()
        names = [os.path.join(scratch, "ckpt")]  # rank 0's folder, shared by all ranks
        torch.distributed.broadcast_object_list(names, src=0)
        for hf_dir in hf_dirs:
            ckpt = None
            for text in layouts:
                sizes = {k: int(v) for k, v in re.findall(r"(tp|pp|ep|etp)(\d+)", text)}
                layout = ParallelLayout(sizes.get("tp", 1), sizes.get("pp", 1), 1, sizes.get("ep", 1),
                                        sizes.get("etp", 1))  # fmt: skip
                arch, chunks = build(hf_dir, layout)
                reader = HFCheckpointReader(hf_dir)
                load_hf_weights(chunks, reader, arch, progress=False)
                result = {"sequence_parallel": chunks[0].config.sequence_parallel}
                compare(chunks, arch, hf_dir, result)
                export(chunks, arch, reader, result)
                if ckpt is None:
                    ckpt = os.path.join(names[0], arch.family)
                    save_sharded({"model": chunks[0].sharded_state_dict()}, ckpt)
                else:
                    with torch.no_grad():
                        for param in chunks[0].parameters():
                            param.zero_()
                    sharded = {"model": chunks[0].sharded_state_dict()}
                    chunks[0].load_state_dict(load_sharded(sharded, ckpt)["model"])
                    compare(chunks, arch, hf_dir, result, key="ckpt_logits_max_abs_diff")
                results[f"{arch.family}/{text}"] = result
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf-dir", required=True, action="append")
    for name in ("tp", "pp", "ep", "etp"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--load-ckpt")
    parser.add_argument("--save-ckpt")
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--sweep", nargs="+", help="layouts, e.g. tp2 pp2 (every --hf-dir under each)")
    args = parser.parse_args()

    if args.sweep:
        result = sweep(args.hf_dir, args.sweep)
    else:
        (hf_dir,) = args.hf_dir
        arch, chunks = build(hf_dir, ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp))
        reader = HFCheckpointReader(hf_dir)
        if args.load_ckpt:
            sharded = {"model": chunks[0].sharded_state_dict()}
            chunks[0].load_state_dict(load_sharded(sharded, args.load_ckpt)["model"])
        else:
            load_hf_weights(chunks, reader, arch, progress=False)
        result = {"sequence_parallel": chunks[0].config.sequence_parallel}
        compare(chunks, arch, hf_dir, result)
        if args.export:
            export(chunks, arch, reader, result)
        if args.save_ckpt:
            save_sharded({"model": chunks[0].sharded_state_dict()}, args.save_ckpt)
    finish(args.out, result)


if __name__ == "__main__":
    main()

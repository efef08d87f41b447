"""Convert a Megatron distributed checkpoint of Qwen3-MoE back to a Hugging Face checkpoint.

    python tools/convert_mcore_to_hf.py --mcore-dir MCORE --hf-template HF --out HF_OUT
    torchrun --nproc_per_node=2 tools/convert_mcore_to_hf.py ... --ep 2      # spread a large model over ranks

``--hf-template`` gives ``config.json`` and the tokenizer files, which are copied next to the weights, so the
result loads in transformers and SGLang. ``--out`` is written to ``OUT.tmp`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_sapo.errors import InputError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mcore-dir", required=True, help="Megatron distributed checkpoint folder")
    parser.add_argument("--hf-template", required=True, help="HF folder with config.json (+ tokenizer files)")
    parser.add_argument("--out", required=True, help="HF checkpoint folder to create")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    parser.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_sapo.checkpoint import checkpoint_dtype, is_complete_checkpoint, load_sharded, replace_dir
    from megatron_sapo.convert.hf_io import write_hf_checkpoint
    from megatron_sapo.convert.megatron_io import export_hf_weights
    from megatron_sapo.models.qwen3_moe import ModelOptions, Qwen3MoeArch, build_model
    from megatron_sapo.parallel.layout import ParallelLayout, validate_layout
    from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0

    arch = Qwen3MoeArch.from_hf_dir(args.hf_template)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    validate_layout(layout, int(os.environ.get("WORLD_SIZE", "1")), arch, training=False)
    if not is_complete_checkpoint(args.mcore_dir):
        raise InputError(f"--mcore-dir: {args.mcore_dir} is not a complete Megatron distributed checkpoint")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise InputError(f"--out: {args.out} exists and is not empty; pass --overwrite or choose another folder")

    initialize_model_parallel(layout, arch=arch, training=False)
    chunks = build_model(arch, layout, ModelOptions(params_dtype=checkpoint_dtype(args.mcore_dir)))
    sharded = {"model": chunks[0].sharded_state_dict()}
    chunks[0].load_state_dict(load_sharded(sharded, args.mcore_dir, field="--mcore-dir")["model"])
    tmp = os.path.abspath(args.out) + ".tmp"
    named_tensors = export_hf_weights(chunks, arch)
    if is_rank0():
        write_hf_checkpoint(named_tensors, tmp, template_dir=args.hf_template)
        replace_dir(tmp, os.path.abspath(args.out))
        print(f"wrote {args.out}")
    else:
        for _ in named_tensors:  # other ranks take part in the gathers
            pass
    destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""Convert a Hugging Face Qwen3-MoE checkpoint to a Megatron distributed checkpoint (torch_dist format).

    python tools/convert_hf_to_mcore.py --hf-dir HF --out MCORE [--verify]
    torchrun --nproc_per_node=2 tools/convert_hf_to_mcore.py --hf-dir HF --out MCORE --tp 2 [--verify]

The checkpoint loads under any other layout. It is written to ``MCORE.tmp`` and renamed when complete, so a
failed or killed run never leaves a partial ``MCORE``. ``--verify`` reloads the written checkpoint and compares
its logits with transformers' on a fixed random batch, exiting non-zero above ``--tolerance``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_sapo.errors import InputError
from megatron_sapo.parallel.layout import ParallelLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    parser.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=1)
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: the checkpoint's dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verify", action="store_true", help="compare logits with transformers afterwards")
    parser.add_argument("--tolerance", type=float, default=None, help="max abs logit diff (1e-4 fp32, 0.1 bf16)")
    return parser.parse_args(argv)


def checkpoint_dtype(reader) -> torch.dtype:
    name = next(iter(sorted(reader.names())))
    return reader.get(name).dtype


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_sapo.convert.hf_io import HFCheckpointReader
    from megatron_sapo.models.qwen3_moe import Qwen3MoeArch
    from megatron_sapo.parallel.layout import validate_layout

    # Everything that can be wrong with the input is checked before any process group or model exists.
    arch = Qwen3MoeArch.from_hf_dir(args.hf_dir)
    reader = HFCheckpointReader(args.hf_dir)
    reader.validate(arch)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    validate_layout(layout, int(os.environ.get("WORLD_SIZE", "1")), arch, training=False)
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise InputError(f"--out: {args.out} exists and is not empty; pass --overwrite or choose another folder")
    dtype = checkpoint_dtype(reader) if args.dtype == "auto" else DTYPES[args.dtype]
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 0.1)

    from megatron_sapo.checkpoint import load_sharded, save_sharded
    from megatron_sapo.convert.megatron_io import load_hf_weights
    from megatron_sapo.convert.verify import megatron_logits, transformers_logits, verification_batch
    from megatron_sapo.models.qwen3_moe import ModelOptions, build_model
    from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0

    initialize_model_parallel(layout, arch=arch, training=False)
    chunks = build_model(arch, layout, ModelOptions(params_dtype=dtype))
    load_hf_weights(chunks, reader, arch)
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        hf_config = f.read()
    save_sharded({"model": chunks[0].sharded_state_dict()}, args.out, extra_files={"hf_config.json": hf_config})
    if is_rank0():
        print(f"wrote {args.out} (tp={layout.tp} pp={layout.pp} ep={layout.ep} etp={layout.etp}, {dtype})")

    status = 0
    if args.verify:
        for param in chunks[0].parameters():
            param.data.zero_()  # the comparison must see what was written, not what is still in memory
        chunks[0].load_state_dict(load_sharded({"model": chunks[0].sharded_state_dict()}, args.out)["model"])
        input_ids = verification_batch(arch)
        logits = megatron_logits(chunks, input_ids, arch)
        if is_rank0():
            diff = (logits - transformers_logits(args.hf_dir, input_ids, dtype)).abs().max().item()
            ok = diff <= tolerance
            print(f"verify: max abs logit diff vs transformers = {diff:.3e} (tolerance {tolerance:g}) "
                  f"{'OK' if ok else 'FAILED'}")  # fmt: skip
            status = 0 if ok else 1
        flag = torch.tensor([status], device=next(chunks[0].parameters()).device)
        torch.distributed.broadcast(flag, src=0)
        status = int(flag.item())
    destroy()
    return status


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer starts spawn-context processes
    try:
        sys.exit(main())
    except InputError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

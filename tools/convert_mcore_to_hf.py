"""Convert a Megatron distributed checkpoint (Qwen2/2.5, Qwen3, Qwen3-MoE) back to a Hugging Face checkpoint.

    python tools/convert_mcore_to_hf.py --mcore-dir MCORE --hf-template HF --out HF_OUT
    torchrun --nproc_per_node=2 tools/convert_mcore_to_hf.py ... --ep 2      # spread a large model over ranks

``--hf-template`` gives ``config.json`` and the tokenizer files, which are copied next to the weights, so the
result loads in transformers and SGLang. The weights are written as HF writes them: ``model.safetensors``, or
shards of at most ``--max-shard-size`` (5GB) with ``model.safetensors.index.json``. ``--out`` is written to
``OUT.tmp`` and renamed when complete. Each rank holds its own shard of the model once; rank 0 also holds the output
file being filled.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from megatron_sapo.convert.cli import exit_without_teardown, host_only_quiet, parse_size  # noqa: E402
from megatron_sapo.errors import InputError  # noqa: E402

host_only_quiet()
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mcore-dir", required=True, help="Megatron distributed checkpoint folder")
    parser.add_argument("--hf-template", required=True, help="HF folder with config.json (+ tokenizer files)")
    parser.add_argument("--out", required=True, help="HF checkpoint folder to create")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    parser.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="dtype written; auto: the template's torch_dtype (else the checkpoint's)")  # fmt: skip
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file, as save_pretrained's max_shard_size (5GB, 500MB)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from megatron_sapo.checkpoint import checkpoint_dtype, checkpoint_problem
    from megatron_sapo.convert.cli import peak_rss_bytes, summary_line
    from megatron_sapo.convert.hf_io import DTYPES, config_dtype, write_hf_checkpoint
    from megatron_sapo.convert.mapping import hf_shapes
    from megatron_sapo.convert.megatron_io import export_hf_weights, load_checkpoint_in_place
    from megatron_sapo.models import ModelOptions, build_model, load_arch
    from megatron_sapo.parallel.layout import ParallelLayout, validate_layout
    from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0

    arch = load_arch(args.hf_template)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    validate_layout(layout, int(os.environ.get("WORLD_SIZE", "1")), arch, training=False)
    problem = checkpoint_problem(args.mcore_dir)
    if problem:
        raise InputError(f"--mcore-dir: {args.mcore_dir} {problem}; point it at a complete Megatron checkpoint")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise InputError(f"--out: {args.out} exists and is not empty; pass --overwrite or choose another folder")
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as e:
        raise InputError(f"--max-shard-size: {e}") from None
    stored = checkpoint_dtype(args.mcore_dir)
    if args.dtype != "auto":
        dtype = DTYPES[args.dtype]
    else:
        dtype = config_dtype(args.hf_template) or stored

    initialize_model_parallel(layout, arch=arch, training=False)
    # Uninitialised host storage, filled in place by the checkpoint reader.
    chunks = build_model(arch, layout, ModelOptions(params_dtype=stored, init_weights=False))
    load_checkpoint_in_place(chunks, args.mcore_dir, field="--mcore-dir")
    named_tensors = export_hf_weights(chunks, arch)
    if is_rank0():
        named_tensors = tqdm(named_tensors, total=len(hf_shapes(arch)), desc="tensors written", unit="tensor")
        num_tensors, num_bytes = write_hf_checkpoint(
            named_tensors, args.out, template_dir=args.hf_template, max_shard_bytes=max_shard_bytes, dtype=dtype
        )
    else:
        for _ in named_tensors:  # other ranks take part in the gathers
            pass
    peaks = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak_rss_bytes())
    if is_rank0():
        what = f"wrote {args.out} ({dtype})"
        print(summary_line(what, num_tensors, num_bytes, time.perf_counter() - START, max(peaks)))
    destroy()
    return 0


if __name__ == "__main__":
    try:
        exit_without_teardown(main())
    except InputError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

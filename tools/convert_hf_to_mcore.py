"""Convert a Hugging Face checkpoint (Qwen2/2.5, Qwen3, Qwen3-MoE) to a Megatron distributed checkpoint (torch_dist).

    python tools/convert_hf_to_mcore.py --hf-dir HF --out MCORE [--verify]
    torchrun --nproc_per_node=2 tools/convert_hf_to_mcore.py --hf-dir HF --out MCORE --tp 2 [--verify]

The checkpoint loads under any other layout. It is written to ``MCORE.tmp`` and renamed when complete, so a
failed or killed run never leaves a partial ``MCORE``. No model is initialised: each rank maps the HF files and
hands megatron's writer the tensors its shard needs as they lie in the page cache, copying only those it must merge.
``--dtype`` picks the dtype written (default: config.json's ``torch_dtype``). ``--verify`` reloads the written
checkpoint and compares its logits with transformers' on a fixed random batch, exiting non-zero above
``--tolerance``.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from megatron_sapo.convert.cli import exit_without_teardown, host_only_quiet  # noqa: E402
from megatron_sapo.errors import InputError  # noqa: E402

host_only_quiet()
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    parser.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="dtype written; auto: config.json's torch_dtype (else the tensors' own)")  # fmt: skip
    parser.add_argument("--fully-parallel", action=argparse.BooleanOptionalAction, default=False,
                        help="ranks holding the same replicated tensors share writing them (megatron's fully-"
                             "parallel save); off: their first replica writes them, faster on one node's disk "
                             "(bench/convert_bench.py)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verify", action="store_true", help="compare logits with transformers afterwards")
    parser.add_argument("--tolerance", type=float, default=None, help="max abs logit diff (1e-4 fp32, 0.1 bf16)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_sapo.convert.hf_io import DTYPES, HFCheckpointReader, config_dtype
    from megatron_sapo.models import load_arch
    from megatron_sapo.parallel.layout import ParallelLayout, validate_layout

    # Everything that can be wrong with the input is checked before any process group or model exists.
    arch = load_arch(args.hf_dir)
    reader = HFCheckpointReader(args.hf_dir, mapped=True)
    reader.validate(arch)
    layout = ParallelLayout(args.tp, args.pp, 1, args.ep, args.etp)
    validate_layout(layout, int(os.environ.get("WORLD_SIZE", "1")), arch, training=False)
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise InputError(f"--out: {args.out} exists and is not empty; pass --overwrite or choose another folder")
    if args.dtype != "auto":
        dtype = DTYPES[args.dtype]
    else:
        dtype = config_dtype(args.hf_dir) or reader.get(min(reader.names())).dtype
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 0.1)

    from megatron_sapo.checkpoint import save_sharded
    from megatron_sapo.convert.cli import (
        end_child_processes,
        folder_bytes,
        peak_rss_bytes,
        start_writer_results_service,
        summary_line,
    )
    from megatron_sapo.convert.megatron_io import hf_sharded_state_dict, load_checkpoint_in_place
    from megatron_sapo.convert.verify import megatron_logits, transformers_logits, verification_batch
    from megatron_sapo.lifetime import reap_when_gone
    from megatron_sapo.models import ModelOptions, build_model
    from megatron_sapo.parallel.state import destroy, initialize_model_parallel, is_rank0

    reap_when_gone()  # a conversion killed outright (SIGKILL, OOM) takes megatron's writer helpers with it
    writer_results = start_writer_results_service()
    # torch.save's zip records carry a CRC32 of every byte, which megatron's writer processes compute as they write
    # (0.35 s of CPU per GB measured); torch.load reads records without it (torch/serialization.py,
    # set_crc32_options), as megatron's loader does, and the checkpoint's manifest records each file's size.
    torch.serialization.set_crc32_options(False)
    initialize_model_parallel(layout, arch=arch, training=False)
    options = ModelOptions(params_dtype=dtype, init_weights=False)
    with torch.device("meta"):  # the model only describes the sharding: its tensors come from the HF files
        chunks = build_model(arch, layout, options)
    # Waited for here, before the work that grows with the checkpoint: it overlaps only fixed work, so that the cost
    # per GB that bench/convert_bench.py derives from a small and a large conversion hides none of the reading.
    writer_results.join()
    sharded = hf_sharded_state_dict(chunks, reader, arch)
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        hf_config = f.read()
    save_sharded(sharded, args.out, extra_files={"hf_config.json": hf_config}, fully_parallel=args.fully_parallel)
    end_child_processes()
    del sharded, chunks

    status = 0
    if args.verify:  # a fresh model, filled from what was written
        chunks = build_model(arch, layout, options)
        load_checkpoint_in_place(chunks, args.out, field="--out")
        input_ids = verification_batch(arch)
        logits = megatron_logits(chunks, input_ids, arch)
        if is_rank0():
            diff = (logits - transformers_logits(args.hf_dir, input_ids, dtype)).abs().max().item()
            ok = diff <= tolerance
            print(f"verify: max abs logit diff vs transformers = {diff:.3e} (tolerance {tolerance:g}) "
                  f"{'OK' if ok else 'FAILED'}")  # fmt: skip
            status = 0 if ok else 1
        flag = torch.tensor([status])
        torch.distributed.broadcast(flag, src=0)
        status = int(flag.item())

    peaks = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak_rss_bytes())
    if is_rank0():
        what = f"wrote {args.out} (tp={layout.tp} pp={layout.pp} ep={layout.ep} etp={layout.etp}, {dtype})"
        print(summary_line(what, len(reader.names()), folder_bytes(args.out), time.perf_counter() - START, max(peaks)))
    destroy()
    return status


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer starts spawn-context processes
    try:
        exit_without_teardown(main())
    except InputError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

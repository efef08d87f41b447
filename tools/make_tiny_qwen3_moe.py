"""Make a tiny random Qwen3-MoE HF checkpoint and its sentencepiece tokenizer.

python tools/make_tiny_qwen3_moe.py --out /tmp/tiny [--hidden-size 64 --num-experts 4 ...]
"""

import argparse
import dataclasses
import sys

from megatron_sapo.models.tiny import TinyQwen3MoeSizes, make_tiny_qwen3_moe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    for field in dataclasses.fields(TinyQwen3MoeSizes):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    sizes = TinyQwen3MoeSizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyQwen3MoeSizes)})
    print(make_tiny_qwen3_moe(args.out, sizes, seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())

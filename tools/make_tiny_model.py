"""Make a tiny random HF checkpoint of a supported family and its sentencepiece tokenizer.

python tools/make_tiny_model.py --out /tmp/tiny [--family qwen3_moe|qwen2|qwen3] [--hidden-size 64 ...]

Unset sizes take the family's defaults (megatron_sapo/models/tiny.py), chosen to exercise every mapping case.
"""

import argparse
import dataclasses
import sys

from megatron_sapo.models.tiny import FAMILIES, TinySizes, make_tiny_model, tiny_sizes


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: use true or false")
    return text.lower() in ("true", "1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    parser.add_argument("--seed", type=int, default=0)
    fields = dataclasses.fields(TinySizes)
    for field in fields:
        kind = _bool if isinstance(field.default, bool) else type(field.default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None)
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    print(make_tiny_model(args.out, args.family, tiny_sizes(args.family, **given), seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())

"""The demo's short supervised warm start: teach the tiny random model the answer format, and a little arithmetic.

A ~200k-parameter model initialised at random almost never writes ``Answer: <number>``, so RL alone would see no
reward for a long time. A few dozen supervised steps on reference responses (transformers + AdamW, one process)
bring the sampled accuracy to roughly 0.1–0.3; SAPO then has to do the rest.

    python recipes/tiny_moe/warm_start.py --hf-dir TINY --train-file train.jsonl --out WARM --steps 60
"""

from __future__ import annotations

import argparse
import random
import shutil

import torch

from megatron_sapo.convert.hf_io import copy_side_files
from megatron_sapo.data import DataConfig, load_prompts, load_tokenizer
from megatron_sapo.data.arithmetic import reference_response


def warm_start(
    hf_dir: str, train_file: str, out_dir: str, *, steps: int, lr: float, batch_size: int, seed: int
) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(hf_dir)
    items = load_prompts(DataConfig(train_files=[train_file], max_prompt_length=64), tokenizer).items
    examples = [(item.prompt_ids, tokenizer.encode(reference_response(item.label)) + [tokenizer.eos_token_id])
                for item in items]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        width = max(len(p) + len(r) for p, r in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)  # loss on the response only
        for row, (prompt, response) in enumerate(batch):
            input_ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
            labels[row, len(prompt) : len(prompt) + len(response)] = torch.tensor(response)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"warm start step {step}: loss {loss.item():.3f}", flush=True)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    copy_side_files(hf_dir, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.move(tmp, out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warm_start(args.hf_dir, args.train_file, args.out, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
               seed=args.seed)  # fmt: skip


if __name__ == "__main__":
    main()

"""Where a training step's time goes: the share of rollout, old log-probs, update and weight sync per step.

It reads the ``timing/*`` metrics a run wrote to ``<run>/metrics.jsonl`` (each phase is timed by the trainer on
rank 0 around the same step), so the shares are measured side by side in one run::

    make demo && python bench/step_bench.py outputs/demo/run

The first ``--skip`` steps are left out: they include one-off warm-up (allocator, thread pools, first sync).
"""

from __future__ import annotations

import argparse
import statistics

from megatron_sapo.metrics import read_metrics

PHASES = ("rollout", "old_log_probs", "update", "weight_sync")


def phase_shares(rows: list[dict]) -> dict[str, float]:
    """Each phase's fraction of the summed time of all phases over ``rows``."""
    totals = {phase: sum(row.get(f"timing/{phase}", 0.0) for row in rows) for phase in PHASES}
    whole = sum(totals.values())
    return {phase: total / whole for phase, total in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="outputs/demo/run", help="a trainer output folder")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps to leave out")
    args = parser.parse_args(argv)
    # Training steps only: a step-0 line holds the validation before training.
    rows = [row for row in read_metrics(args.run) if "timing/update" in row][args.skip :]
    if not rows:
        raise SystemExit(f"error: {args.run}/metrics.jsonl has no steps after the first {args.skip}")
    step_s = [sum(row.get(f"timing/{phase}", 0.0) for phase in PHASES) for row in rows]
    print(f"{len(rows)} steps, median step {statistics.median(step_s):.3f} s, "
          f"median {statistics.median(row['perf/tokens_per_s'] for row in rows):.0f} tokens/s")  # fmt: skip
    for phase, share in phase_shares(rows).items():
        median = statistics.median(row.get(f"timing/{phase}", 0.0) for row in rows)
        print(f"  {phase:<14} {share:6.1%} of step time   median {median:.3f} s")


if __name__ == "__main__":
    main()

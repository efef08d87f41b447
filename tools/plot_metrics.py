"""Plot a run's main training curves from ``RUN_DIR/metrics.jsonl`` into one PNG grid.

    python tools/plot_metrics.py outputs/qwen3_30b_a3b_sapo [--out curves.png]

One panel per quantity (reward, response length, entropy, SAPO gate weight, KL, grad norm, loss, rollout/trainer
log-prob gap, step time by phase, throughput); keys a run did not log are skipped. Prints the PNG's path; a
missing, empty or unreadable metrics file is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

METRICS_FILE = "metrics.jsonl"  # megatron_sapo.metrics.METRICS_FILE, without importing torch for a plot

# (panel title, metric keys drawn in it). timing/* is expanded to every timing key the run logged.
# Gradient norms span orders of magnitude (one bad batch before clipping), so that panel is log-scaled.
PANELS = [
    ("reward", ["reward/mean", "reward/shaped_mean", "val/reward/mean"]),
    ("response length (tokens)", ["response_length/mean"]),
    ("entropy", ["actor/entropy"]),
    ("SAPO gate weight (mean)", ["actor/grad_weight_mean"]),
    ("approx. KL to the behaviour policy", ["actor/approx_kl"]),
    ("grad norm (before clipping, log scale)", ["actor/grad_norm"]),
    ("policy loss", ["actor/pg_loss"]),
    ("rollout vs trainer log-prob diff", ["rollout/logprob_diff"]),
    ("time per step by phase (s)", ["timing/*"]),
    ("throughput (tokens/s)", ["perf/tokens_per_s"]),
]


class MetricsError(Exception):
    """The metrics file is missing, empty or not JSON lines; the message is one line."""


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise MetricsError(f"{path} does not exist; pass the run's output_dir (trainer.output_dir)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MetricsError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict):
                raise MetricsError(f"{path}:{number}: expected a JSON object per line")
            records.append(record)
    if not records:
        raise MetricsError(f"{path} is empty: the run has not finished a step yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records that have a finite number for it."""
    steps, values = [], []
    for index, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record.get("step", index + 1))
            values.append(float(value))
    return steps, values


def panel_keys(records: list[dict], patterns: list[str]) -> list[str]:
    present = sorted({key for record in records for key in record})
    keys = []
    for pattern in patterns:
        if pattern.endswith("*"):
            keys += [key for key in present if key.startswith(pattern[:-1])]
        elif pattern in present:
            keys.append(pattern)
    return [key for key in keys if series(records, key)[0]]


def plot(records: list[dict], out: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(name, keys) for name, patterns in PANELS if (keys := panel_keys(records, patterns))]
    if not panels:
        raise MetricsError(f"{title}: none of the plotted metrics ({', '.join(k for _, p in PANELS for k in p)}) "
                           "were logged")  # fmt: skip
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, (name, keys) in zip(axes.flat, panels, strict=False):  # spare axes are hidden below
        for key in keys:
            steps, values = series(records, key)
            axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        if "log scale" in name:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run's output folder, holding metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(os.path.join(args.run_dir, METRICS_FILE))
        out = plot(records, args.out or os.path.join(args.run_dir, "metrics.png"), title=os.path.basename(
            os.path.abspath(args.run_dir)))  # fmt: skip
    except (MetricsError, OSError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-step metrics: one JSON line per step in ``<output_dir>/metrics.jsonl``, TensorBoard and wandb when present."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Rank 0's metrics sink. On resume, lines of steps after the checkpoint are dropped first, so the file reads
    as if the run had never been interrupted."""

    def __init__(
        self, output_dir: str, *, resume_step: int = 0, tensorboard: bool = True, wandb_project=None, config=None
    ):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._truncate_after(resume_step)
        self.tensorboard = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, dir=output_dir, resume="allow")
            except ImportError:
                logger.warning("trainer.wandb_project is set but wandb is not installed; pip install wandb")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]

"""`train --tensorboard`: the metrics.jsonl scalars and the sample grids, also written for TensorBoard.

TensorBoard is an optional extra (`pip install 'styleshift[tensorboard]'`); without it training goes on
with one line saying so.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

NOT_SCALARS = {"step", "epoch", "eval_images"}


class TensorboardLog:
    def __init__(self, writer) -> None:
        self.writer = writer

    def scalars(self, record: dict) -> None:
        """Every finite number of a metrics.jsonl record, under losses/ or eval/, at its step."""
        step = record["step"]
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                group = "eval" if key.startswith("eval_") else "train"
                self.writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A 3 x H x W grid in [0, 1]."""
        self.writer.add_image(tag, grid.float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(log_dir: Path) -> TensorboardLog | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module needs the `tensorboard` package
        print("--tensorboard: the tensorboard package is not installed (pip install 'styleshift[tensorboard]'); "
              "training goes on without it", file=sys.stderr)
        return None
    return TensorboardLog(SummaryWriter(str(log_dir)))

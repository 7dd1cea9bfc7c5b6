"""Metrics as data: one JSON object per line, flushed as written, so a killed run keeps them.

Plots and reports read these files, never values held in memory (``ddgpipe plot RUN_DIR``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["MetricsWriter", "RunningStats", "plain_record"]


class MetricsWriter:
    """Appends records to ``RUN_DIR/metrics.jsonl``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lines = len(self.path.read_text().splitlines()) if self.path.exists() else 0
        self._file = self.path.open("a")

    def write(self, kind: str, **fields) -> dict:
        return self.write_record(plain_record(kind, **fields))

    def write_record(self, record: dict) -> dict:
        """Append a record made by :func:`plain_record`."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plain_record(kind: str, **fields) -> dict:
    """A record as metrics.jsonl holds it: its kind, then plain JSON values."""
    return {"kind": kind, **{k: _plain(v) for k, v in fields.items()}}


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it readable and parseable
    return value


class RunningStats:
    """Sums of loss and correct predictions over an epoch, fed from inside the loss function.

    The sums stay tensors on the loss's device until read, so feeding them never makes a
    GPU stage wait for its kernels; reading :attr:`loss` or :attr:`accuracy` does. On the CPU
    the arithmetic is the float64 of Python floats, so the numbers are the same either way.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._loss_sum = 0.0
        self._correct = 0
        self.seen = 0
        self.predictions = 0  # samples, or tokens for [B, T, V] logits

    def add(self, loss, logits, targets) -> None:
        """Count one minibatch: its mean ``loss`` (a 0-dim tensor or a float); accuracy over
        samples (``[B, C]`` logits) or over tokens (``[B, T, V]`` against ``[B, T]``)."""
        n = targets.shape[0]
        loss = loss.detach().double() if hasattr(loss, "detach") else float(loss)
        self._loss_sum = self._loss_sum + loss * n
        self.seen += n
        if logits.dim() == targets.dim() + 1 and logits.shape[:-1] == targets.shape:
            self._correct = self._correct + (logits.argmax(dim=-1) == targets).sum()
            self.predictions += targets.numel()

    @property
    def loss_sum(self) -> float:
        return float(self._loss_sum)

    @property
    def correct(self) -> int:
        return int(self._correct)

    def state(self) -> list:
        """``[loss_sum, correct, seen, predictions]`` as plain numbers, for a checkpoint."""
        return [self.loss_sum, self.correct, self.seen, self.predictions]

    def load_state(self, state: list) -> None:
        self._loss_sum, self._correct, self.seen = float(state[0]), int(state[1]), int(state[2])
        self.predictions = int(state[3]) if len(state) > 3 else self.seen  # format 4: samples

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.predictions, 1)

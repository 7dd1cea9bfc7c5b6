"""Where a run's metrics records go beside ``metrics.jsonl`` (``--log tensorboard,csv``).

The sinks are views of ``metrics.jsonl``: opened at the start of a run, they are rebuilt
from the records the file keeps (all of them when a run resumes, after the records written
past its checkpoint were dropped), then every new record reaches them as it reaches the file.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ddgpipe.errors import UsageError

__all__ = ["SINKS", "TENSORBOARD_DIR", "CSV_FILES", "check_sinks", "open_sinks", "Sink",
           "CsvSink", "TensorBoardSink", "csv_path"]

SINKS = ("tensorboard", "csv")
TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard: the event file
RECORD_KINDS = ("iter", "eval", "epoch")  # what the training loop records
CSV_FILES = tuple(f"metrics-{kind}.csv" for kind in RECORD_KINDS)


def csv_path(run_dir: str | Path, kind: str) -> Path:
    return Path(run_dir) / f"metrics-{kind}.csv"


def check_sinks(names: Sequence[str]) -> None:
    """Refuse an unknown sink, and TensorBoard when its package is not installed."""
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise UsageError(f"unknown --log sink {unknown[0]!r}; choose from {', '.join(SINKS)} "
                         "(comma-separated)")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--log tensorboard needs the tensorboard package: pip install "
                         "ddgpipe[tensorboard]")


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def open_sinks(names: Sequence[str], run_dir: Path) -> list[Sink]:
    """The sinks ``names`` in ``run_dir``, holding the records metrics.jsonl keeps."""
    sinks: list[Sink] = []
    for name in names:
        sinks.append(TensorBoardSink(run_dir) if name == "tensorboard" else CsvSink(run_dir))
    path = run_dir / "metrics.jsonl"
    kept = path.read_text().splitlines() if sinks and path.exists() else []
    for line in kept:
        record = json.loads(line)
        for sink in sinks:
            sink.write(record)
    return sinks


class CsvSink:
    """One CSV file per record kind, with a header; a record with a new key widens it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.columns: dict[str, list[str]] = {}
        for name in CSV_FILES:  # rebuilt from metrics.jsonl
            (run_dir / name).unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        row = {k: v for k, v in record.items() if k != "kind"}
        path = csv_path(self.run_dir, kind)
        before = self.columns.get(kind, [])
        columns = [*before, *(k for k in row if k not in before)]
        if columns != before or kind not in self.columns:
            rows: list[dict] = []
            if kind in self.columns:
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
            self.columns[kind] = columns
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(rows)
        with path.open("a", newline="") as f:
            csv.DictWriter(f, columns).writerow(row)

    def close(self) -> None:
        pass  # every row is written and closed as it comes


class TensorBoardSink:
    """Every number of every record as a scalar ``KIND/KEY`` at step ``iteration``, in a new
    event file under RUN_DIR/tensorboard (the folder is rebuilt from metrics.jsonl)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / TENSORBOARD_DIR
        shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict[str, Any]) -> None:
        kind, step = record["kind"], record.get("iteration")
        for key, value in record.items():
            number = as_number(value)
            if key not in ("kind", "iteration") and number is not None:
                self.writer.add_scalar(f"{kind}/{key}", number, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def as_number(value: Any) -> float | None:
    """A record's value as a scalar: numbers, and NaN/inf that JSON holds as text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None

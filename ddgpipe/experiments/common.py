"""What every experiment shares: a grid of independent runs, trained in worker processes and
resumed from the runs already finished, and the outcome each run leaves.

Why and how: ``docs/design.md``, "Experiments: resumable grids".
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ddgpipe.errors import NonFiniteLossError
from ddgpipe.runtime.launch import sigterm_raises, thread_locked_bars
from ddgpipe.training import TrainConfig, train
from ddgpipe.training.checkpoints import atomic_write_bytes
from ddgpipe.training.config import flatten
from ddgpipe.training.plots import read_jsonl

__all__ = ["FINISHED", "DIVERGED", "DIVERGED_FILE", "UNRECORDED_MACHINE", "read_outcome",
           "run_grid", "mean_std", "config_matches", "machines_line", "run_machine",
           "microbatching_available"]

FINISHED, DIVERGED = "finished", "diverged"
DIVERGED_FILE = "diverged.json"
# config.json keys that train() writes from what it derived (the cut used, the label shown)
# or that do not change the numbers (progress bar, folder, resume source, replacing a run)
IGNORED_KEYS = frozenset({"label", "split", "progress", "out", "resume", "overwrite"})
UNRECORDED_MACHINE = "a machine not recorded (runs from before ddgpipe recorded it)"


def config_matches(config: TrainConfig, run_dir: Path) -> bool:
    """Whether ``run_dir/config.json`` was written for a run with this config. A setting the
    file lacks was added to ddgpipe after the run, which then had its default."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(saved, dict):
        return False
    saved = flatten(saved)
    wanted = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as saved
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    return all(
        saved.get(key, defaults.get(key)) == value for key, value in wanted.items()
        if key not in IGNORED_KEYS)


def run_machine(run_dir: Path) -> str:
    """The CPU (and vector unit) a finished run was trained on, from its config.json."""
    try:
        machine = json.loads((run_dir / "config.json").read_text()).get("machine")
    except (OSError, json.JSONDecodeError, AttributeError):
        machine = None
    if not isinstance(machine, dict):
        return UNRECORDED_MACHINE
    return f"{machine.get('processor', '?')} ({machine.get('cpu_capability', '?')})"


def machines_line(outcomes: Sequence[dict | None]) -> str:
    """One sentence naming the machines the runs came from: numbers of one seed differ
    in their last bits between CPU kinds, so a grid trained on several says so."""
    counts = Counter(o.get("machine", UNRECORDED_MACHINE) for o in outcomes if o is not None)
    if not counts:
        return ""
    if len(counts) == 1:
        return f"Every run was trained on one kind of machine: {next(iter(counts))}."
    parts = "; ".join(f"{n} on {name}" for name, n in counts.most_common())
    return ("The runs come from several kinds of machine, whose float results differ in the "
            f"last bits, as another seed's would: {parts}.")


def read_outcome(config: TrainConfig) -> dict | None:
    """The run's outcome from its folder, or None when it has not run to an end with this
    config (never started, stopped halfway, or trained with other settings)."""
    run_dir = Path(str(config.out))
    if not config_matches(config, run_dir):
        return None
    outcome = {"out": str(run_dir), "method": config.method, "stages": config.stages,
               "seed": config.seed, "epochs": config.epochs, "machine": run_machine(run_dir)}
    diverged = run_dir / DIVERGED_FILE
    if diverged.exists():
        try:
            error = json.loads(diverged.read_text()).get("error", "diverged")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        return outcome | {"status": DIVERGED, "error": error, "test_acc": None,
                          "test_loss": None, "train_loss": None, "train_time_s": None}
    path = run_dir / "metrics.jsonl"
    records = read_jsonl(path) if path.exists() else []
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if config.iterations:  # the run ends at an iteration, inside an epoch or not
        last = next((r for r in epochs if r.get("iteration") == config.iterations), None)
    else:
        last = next((r for r in epochs if r.get("epoch") == config.epochs), None)
    if last is None:
        return None
    found = outcome | {"status": FINISHED, "error": None, "test_acc": float(last["test_acc"]),
                       "test_loss": float(last["test_loss"]),
                       "train_loss": float(last["train_loss"]),
                       "train_time_s": float(last.get("wall_time", math.nan))}
    evals = [r for r in records if r.get("kind") == "eval"]
    if evals and "val_bits_per_byte" in evals[-1]:  # a language model's held-out loss
        found |= {"val_loss": float(evals[-1]["val_loss"]),
                  "val_bits_per_byte": float(evals[-1]["val_bits_per_byte"]),
                  "tokens": int(evals[-1]["tokens"])}
    return found


def _train_one(config: TrainConfig) -> str:
    """One run in a worker process; a diverged loss is recorded, anything else raises."""
    run_dir = Path(str(config.out))
    (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # an old outcome of other settings
    try:  # a run left unfinished (or of other settings) is trained again from the start
        train(dataclasses.replace(config, overwrite=True))
    except NonFiniteLossError as e:
        atomic_write_bytes(run_dir / DIVERGED_FILE, (json.dumps(
            {"error": str(e), "minibatch": e.minibatch}) + "\n").encode())
    return str(run_dir)


def _describe(outcome: dict | None) -> str:
    if outcome is None:
        return "no outcome recorded"
    if outcome["status"] == DIVERGED:
        return "diverged"
    if "val_loss" in outcome:  # a language model: its held-out loss, not next-byte accuracy
        return (f"val loss {outcome['val_loss']:.3f} ({outcome['val_bits_per_byte']:.3f} "
                "bits/byte)")
    return f"test acc {100 * outcome['test_acc']:6.2f}%"


def run_grid(configs: Sequence[TrainConfig], out: Path, workers: int,
             progress: bool = True) -> list[dict]:
    """Train the runs that have no outcome yet; return every run's outcome, in order.

    Runs go to a spawn pool of ``workers`` processes as they are listed (put the ones a
    partial grid most needs first). Progress, one line per run, goes to stderr.
    """
    todo = [c for c in configs if read_outcome(c) is None]
    if progress and len(todo) < len(configs):
        print(f"{len(configs) - len(todo)} of {len(configs)} runs already finished in {out}; "
              f"training the other {len(todo)}", file=sys.stderr, flush=True)
    _prepare_data({c.data for c in todo}, {c.data: c.data_dir for c in todo})
    start = time.perf_counter()
    if todo:
        by_out = {c.out: c for c in todo}
        with sigterm_raises(), mp.get_context("spawn").Pool(
                min(workers, len(todo)), initializer=thread_locked_bars,
                maxtasksperchild=8) as pool:
            for i, done in enumerate(pool.imap_unordered(_train_one, todo), 1):
                if progress:
                    name = str(Path(done).relative_to(out)) if Path(done).is_relative_to(out) \
                        else done
                    print(f"[{i}/{len(todo)}] {name:<36} {_describe(read_outcome(by_out[done]))}"
                          f"  ({time.perf_counter() - start:.0f}s)", file=sys.stderr,
                          flush=True)
    outcomes = []
    for config in configs:
        outcome = read_outcome(config)
        if outcome is None:
            raise RuntimeError(f"run {config.out} ended without writing its metrics; see its "
                               "folder")
        outcomes.append(outcome)
    return outcomes


def _prepare_data(names: set[str], data_dirs: dict[str, str | None]) -> None:
    """Load each data set once here, so a generated one (mnist1d) is generated and cached
    once, not by every worker at the same time."""
    from ddgpipe.data import load_dataset

    for name in sorted(names):
        if name == "mnist1d":
            load_dataset(name, data_dirs.get(name))


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def microbatching_available() -> bool:
    """Whether this ddgpipe's TrainConfig has microbatched DDG (``microbatches``): the grids
    leave its variants out of their defaults until it does."""
    return any(f.name == "microbatches" for f in dataclasses.fields(TrainConfig))

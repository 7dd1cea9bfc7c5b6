"""The number a user decides by: wall-clock time to the best backprop's final loss at K = 2,
for two-thread backprop, DDP, GPipe, 1F1B and the recommended DDG.

Steps come from the study (GPipe, 1F1B and DDP compute backprop's exact gradient at the same
batch, so they need backprop's steps; DDG needs its iso-loss steps); time per step from
``ddgpipe bench`` rows of the study's model on this machine (threads or processes on its
cores), which the command line runs (bench and experiments sit side by side: neither imports
the other). Every row steps with the study's optimizer (AdamW), and the DDG row with the
variant's compensation (``ddg-m4+wp``), so the time is that of what the study recommends.
Time to the loss = steps x seconds per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddgpipe.errors import UsageError
from ddgpipe.experiments.lm.summary import find
from ddgpipe.experiments.lm.variants import VARIANTS_BY_NAME

__all__ = ["choose_variant", "combine", "ddg_bench_row", "bench_settings", "saved_bench",
           "write_wallclock", "WALLCLOCK_K"]

WALLCLOCK_K = 2
PIPELINE_MICROBATCHES = (2, 4)
#: what each bench row is, in the report's words
ROW_TEXT = {"bp-2t": "backprop, one process, two threads", "ddp": "DDP, 2 replicas",
            "ddg-graph-threads": "DDG, threaded executor, one thread per stage"}


def ddg_bench_row(variant: str) -> str:
    """The bench row that times a DDG variant: microbatched DDG's ``ddg-mM``, else DDG on the
    threaded executor, with ``+COMP`` when it has a compensation (its own cost is timed)."""
    chosen = VARIANTS_BY_NAME[variant]
    row = f"ddg-m{chosen.microbatches}" if chosen.microbatches > 1 else "ddg-graph-threads"
    return f"{row}+{chosen.compensation}" if chosen.compensation else row


def bench_settings(plan: Any, ddg_row: str) -> dict:
    """``BenchConfig``'s settings: the study's model, width, context, batch and optimizer
    at K = 2."""
    batch = plan.recipe["batch_size"]
    ms = [m for m in PIPELINE_MICROBATCHES if batch % m == 0]
    pipes = [f"{s}-m{m}" for s in ("gpipe", "1f1b") for m in ms
             if s == "gpipe" or m >= WALLCLOCK_K]  # torch's 1F1B needs M >= K
    steps, warmup, rounds = (2, 1, 1) if plan.quick else (20, 5, 3)
    return {"model": plan.model, "batch_size": batch, "stages": WALLCLOCK_K,
            "context": plan.shape["context"], "width": plan.shape["width"],
            "microbatches": ms, "configs": ["bp-2t", "ddp", *pipes, ddg_row],
            "optimizer": plan.recipe["optimizer"],  # adamw: a bench.json of SGD is not reused
            "steps": steps, "warmup": warmup, "rounds": rounds}


def saved_bench(bench_dir: Path, settings: dict) -> dict | None:
    """``bench_dir/bench.json`` when it was timed with these settings (a resumed study
    does not time again), else None."""
    path = bench_dir / "bench.json"
    try:
        result = json.loads(path.read_text())
        saved = result["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return result if all(saved.get(k) == v for k, v in settings.items()) else None


def combine(bench_rows: list[dict], horizon: int, ddg_row: str, ddg_steps: float | None,
            batch_size: int) -> list[dict]:
    """Per bench row (bar the one-thread baseline): steps to the best backprop's final
    loss, seconds per step, and their product; DDG's steps are its iso-loss steps, every
    other row's are backprop's (the horizon)."""
    table = []
    for row in bench_rows:
        name = row["name"]
        if name == "bp-1t":
            continue
        per_s = row.get("images_per_s")
        step_s = batch_size / per_s if per_s else None
        steps = ddg_steps if name == ddg_row else float(horizon)
        table.append({"name": name, "what": _describe(name),
                      "samples_per_s": per_s, "step_s": step_s, "steps": steps,
                      "time_s": None if steps is None or step_s is None else steps * step_s,
                      "error": row.get("error")})
    base = next((r["time_s"] for r in table if r["name"] == "bp-2t"), None)
    for entry in table:
        entry["vs_bp_2t"] = entry["time_s"] / base if base and entry["time_s"] else None
    return table


def _describe(name: str) -> str:
    """A row in the report's words: ``ddg-m4+wp`` is "microbatched DDG, 4 microbatches, + wp"."""
    row, _, compensation = name.partition("+")
    kind, _, m = row.partition("-m")
    words = {"gpipe": "GPipe (torch.distributed.pipelining)", "1f1b": "1F1B (torch)",
             "ddg": "microbatched DDG"}
    text = ROW_TEXT.get(row) or (f"{words.get(kind, kind)}, {m} microbatches" if m else row)
    return f"{text}, + {compensation}" if compensation else text


def choose_variant(summary: dict, recommended: str | None) -> tuple[str, dict]:
    """The DDG variant to time (``recommended``, else the study's recommendation, else its
    closest at K = 2) and its K = 2 row at the longest horizon it finished."""
    name = recommended or summary["goal"].get("recommended") or \
        (summary["goal"].get("per_k", {}).get(str(WALLCLOCK_K)) or {}).get("variant")
    if name is None:
        raise UsageError("--wallclock needs a DDG variant finished at K = 2: train the study "
                         "first, or name one with --recommended")
    if name not in VARIANTS_BY_NAME or VARIANTS_BY_NAME[name].method == "bp":
        raise UsageError(f"--recommended {name!r} is not a DDG variant of the study")
    for horizon in sorted({r["horizon"] for r in summary["rows"]}, reverse=True):
        row = find(summary["rows"], horizon, name, WALLCLOCK_K)
        if row and row["target_reached"] is not None:
            return name, row
    raise UsageError(f"{name} has no finished run at K = {WALLCLOCK_K} to take its steps "
                     "from")


def write_wallclock(name: str, row: dict, settings: dict, bench: dict, out: Path) -> dict:
    """``out/wallclock.json``: the bench's speeds times the study's steps; the study's report
    shows it."""
    ddg_row = ddg_bench_row(name)
    record = {"variant": name, "horizon": row["horizon"], "ddg_row": ddg_row,
              "iso_steps": row["iso_steps"], "batch_size": settings["batch_size"],
              "bench_steps": settings["steps"], "bench_rounds": settings["rounds"],
              "bench_optimizer": settings.get("optimizer", "sgd"),  # what every row stepped
              "machine": bench.get("machine"),
              "rows": combine(bench["rows"], row["horizon"], ddg_row, row["iso_steps"],
                              settings["batch_size"])}
    (out / "wallclock.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

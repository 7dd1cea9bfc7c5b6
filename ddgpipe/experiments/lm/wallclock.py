"""The number a user decides by: wall-clock time to the best backprop's final loss at K = 2,
for two-thread backprop, DDP, GPipe, 1F1B and the recommended DDG.

Steps come from the study (GPipe, 1F1B and DDP compute backprop's exact gradient at the same
batch, so they need backprop's steps; DDG needs its iso-loss steps); time per step from
``ddgpipe bench`` rows of the study's model on this machine (threads or processes on its
cores). Time to the loss = steps x seconds per step.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ddgpipe.errors import UsageError
from ddgpipe.experiments.lm.summary import find
from ddgpipe.experiments.lm.variants import VARIANTS_BY_NAME

__all__ = ["run_wallclock", "combine", "ddg_bench_row", "bench_config", "WALLCLOCK_K"]

WALLCLOCK_K = 2
PIPELINE_MICROBATCHES = (2, 4)
#: what each bench row is, in the report's words
ROW_TEXT = {"bp-2t": "backprop, one process, two threads", "ddp": "DDP, 2 replicas",
            "ddg-graph-threads": "DDG, threaded executor, one thread per stage"}


def ddg_bench_row(variant: str) -> str:
    """The bench row that times a DDG variant: microbatched DDG's ``ddg-mM``, else plain DDG
    on the threaded executor (a compensation's own cost is not in the bench)."""
    m = VARIANTS_BY_NAME[variant].microbatches
    return f"ddg-m{m}" if m > 1 else "ddg-graph-threads"


def bench_config(plan: Any, ddg_row: str) -> Any:
    """The bench settings: the study's model, width, context and batch at K = 2."""
    from ddgpipe.bench import BenchConfig

    batch = plan.recipe["batch_size"]
    ms = tuple(m for m in PIPELINE_MICROBATCHES if batch % m == 0)
    pipes = [f"{s}-m{m}" for s in ("gpipe", "1f1b") for m in ms
             if s == "gpipe" or m >= WALLCLOCK_K]  # torch's 1F1B needs M >= K
    steps, warmup, rounds = (2, 1, 1) if plan.quick else (20, 5, 3)
    return BenchConfig(model=plan.model, batch_size=batch, stages=WALLCLOCK_K,
                       context=plan.shape["context"], width=plan.shape["width"],
                       microbatches=ms, configs=("bp-2t", "ddp", *pipes, ddg_row),
                       steps=steps, warmup=warmup, rounds=rounds)


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
        table.append({"name": name, "what": ROW_TEXT.get(name, _describe(name)),
                      "samples_per_s": per_s, "step_s": step_s, "steps": steps,
                      "time_s": None if steps is None or step_s is None else steps * step_s,
                      "error": row.get("error")})
    base = next((r["time_s"] for r in table if r["name"] == "bp-2t"), None)
    for entry in table:
        entry["vs_bp_2t"] = entry["time_s"] / base if base and entry["time_s"] else None
    return table


def _describe(name: str) -> str:
    kind, _, m = name.partition("-m")
    words = {"gpipe": "GPipe (torch.distributed.pipelining)", "1f1b": "1F1B (torch)",
             "ddg": "microbatched DDG"}
    return f"{words.get(kind, kind)}, {m} microbatches" if m else name


def _choose(summary: dict, recommended: str | None) -> tuple[str, dict]:
    """The DDG variant to time and its K = 2 row at the longest horizon it finished."""
    name = recommended or summary["goal"].get("recommended") or \
        (summary["goal"].get("per_k", {}).get(str(WALLCLOCK_K)) or {}).get("variant")
    if name is None:
        raise UsageError("--wallclock needs a DDG variant finished at K = 2: train the study "
                         "first, or name one with --recommended")
    if name not in VARIANTS_BY_NAME or VARIANTS_BY_NAME[name].method == "bp":
        raise UsageError(f"--recommended {name!r} is not a DDG variant of the study")
    horizons = sorted({r["horizon"] for r in summary["rows"]}, reverse=True)
    for horizon in horizons:
        row = find(summary["rows"], horizon, name, WALLCLOCK_K)
        if row and row["target_reached"] is not None:
            return name, row
    raise UsageError(f"{name} has no finished run at K = {WALLCLOCK_K} to take its steps "
                     "from")


def run_wallclock(plan: Any, summary: dict, out: Path, recommended: str | None = None,
                  progress: bool = True) -> dict:
    """Time the bench rows (reusing ``out/wallclock/bench.json`` when its settings match) and
    write ``out/wallclock.json``; the study's report shows it."""
    from ddgpipe.bench import run_bench

    name, row = _choose(summary, recommended)
    ddg_row = ddg_bench_row(name)
    config = bench_config(plan, ddg_row)
    bench_dir = out / "wallclock"
    saved = bench_dir / "bench.json"
    result = json.loads(saved.read_text()) if saved.exists() else None
    if result is None or result.get("config") != json.loads(json.dumps(asdict(config))):
        if progress:
            print(f"wall clock: timing {', '.join(config.configs or ())} at K = "
                  f"{WALLCLOCK_K}", file=sys.stderr, flush=True)
        result = run_bench(config, bench_dir, progress=progress)
    record = {"variant": name, "horizon": row["horizon"], "ddg_row": ddg_row,
              "iso_steps": row["iso_steps"], "batch_size": config.batch_size,
              "bench_steps": config.steps, "bench_rounds": config.rounds,
              "machine": result.get("machine"),
              "rows": combine(result["rows"], row["horizon"], ddg_row, row["iso_steps"],
                              config.batch_size)}
    (out / "wallclock.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

"""``ddgpipe demo``: backprop against DDG on the embedded digits, timed as a user would time
them: images per second and the training time to a stated test accuracy.

Why this workload (ResNet-20, 8x8 digits, batch 32): on a 2-core machine backprop's second
thread adds little at this size (its operations are too small to split), so one stage per
core is where a pipeline pays; the README gives the measurements and the workloads where it
does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddgpipe.errors import UsageError

__all__ = ["cmd_demo", "time_to_accuracy", "demo_summary"]

DEMO_BATCH = 32
DEMO_TARGET = 0.98


def epoch_records(run_dir: str | Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]


def time_to_accuracy(run_dir: str | Path, target: float) -> float | None:
    """Training seconds (evaluations excluded) until the first epoch whose test accuracy is
    at least ``target``; None when no epoch reached it."""
    for r in epoch_records(run_dir):
        if r["test_acc"] >= target:
            return float(r["wall_time"])
    return None


def demo_summary(results: list, target: float) -> tuple[str, list[str]]:
    """The demo's table, and one sentence per DDG run comparing it with backprop."""
    bp = results[0]
    header = ("method", "test acc", f"time to {100 * target:g}%", "train time", "images/s",
              "x backprop")
    rows = [header]
    reached = {}
    for r in results:
        reached[r.label] = time_to_accuracy(r.run_dir, target)
        t = reached[r.label]
        rows.append((r.label, f"{100 * r.test_acc:.2f}%", "not reached" if t is None
                     else f"{t:.1f}s", f"{r.train_time_s:.1f}s", f"{r.images_per_s:.0f}",
                     f"{r.images_per_s / bp.images_per_s:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdicts = []
    for r in results[1:]:
        if r.method != "ddg":
            continue
        speed = r.images_per_s / bp.images_per_s
        faster = "faster than" if speed > 1.0 else "slower than"
        sentence = (f"{r.label}: {speed:.2f}x backprop's images/s ({faster} backprop on "
                    f"this machine)")
        mine, theirs = reached[r.label], reached[bp.label]
        if mine is not None and theirs is not None:
            sentence += (f"; {100 * target:g}% test accuracy after {mine:.1f}s of training "
                         f"against backprop's {theirs:.1f}s")
        elif mine is None:
            sentence += f"; it did not reach {100 * target:g}% test accuracy"
        else:
            sentence += f"; backprop did not reach {100 * target:g}% test accuracy"
        verdicts.append(sentence + f"; final test accuracy {100 * r.test_acc:.2f}% against "
                        f"{100 * bp.test_acc:.2f}%.")
    return "\n".join(lines), verdicts


def cmd_demo(args: argparse.Namespace) -> int:
    from ddgpipe.training import TrainConfig, train
    from ddgpipe.training.lm_plots import plot_runs

    if any(k < 2 for k in args.stages):
        raise UsageError(f"--stages for the demo must be >= 2 (got {args.stages}); "
                         "K=1 is backprop, which the demo always runs")
    if not 0 < args.target <= 1:
        raise UsageError(f"--target is a test accuracy between 0 and 1 (got {args.target})")
    out = Path(args.out)
    args.data = args.data or "digits"
    runs = [("bp", 1)] + [("ddg", k) for k in args.stages]
    if args.dni:
        runs.append(("dni", max(args.stages)))
    results = []
    for method, k in runs:
        # backprop on every core; DDG on its default executor (a thread per stage, each with
        # its share of the cores) at the cut this machine timed fastest (cached per machine)
        config = TrainConfig(model=args.model, data=args.data, data_dir=args.data_dir,
                             method=method, stages=k, epochs=args.epochs, seed=args.seed,
                             batch_size=args.batch_size, out=str(out / f"{method}-k{k}"),
                             progress=not args.no_progress, overwrite=True)
        print(f"training {config.display_label()} ({args.model} on {args.data}, "
              f"{args.epochs} epochs, batch {args.batch_size}) ...", flush=True)
        result = train(config)
        assert result is not None, "one process trains every stage here"
        results.append(result)
    table, verdicts = demo_summary(results, args.target)
    print()
    print(table)
    print()
    print("\n".join(verdicts))
    png = plot_runs([str(r.run_dir) for r in results], out / "curves.png",
                    title=f"{args.model} on {args.data}, batch {args.batch_size}: backprop "
                          "and DDG")
    print(f"\nlearning curves: {png}")
    return 0

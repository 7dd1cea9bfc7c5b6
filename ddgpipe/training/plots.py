"""PNG plots drawn from the files runs write, never from values held in memory.

Because every plot reads ``metrics.jsonl``, ``timeline.jsonl`` or ``bench.json``, any run
directory — including one from a run that was killed halfway — can be plotted later, and
what the plot shows is exactly what the files record.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402

from ddgpipe.errors import UsageError  # noqa: E402

__all__ = [
    "read_jsonl", "plot_learning_curves", "plot_timeline", "plot_bench", "plot_loss_by_k",
    "plot_accuracy_vs_k", "plot_mean_loss_panels", "plot_seed_panels", "plot_accuracy_panels",
]

OP_COLOURS = {"F": "tab:blue", "B": "tab:orange", "S": "tab:green", "G": "tab:purple"}
# the names schedule.OP_NAMES gives (not imported: plotting needs no torch)
OP_LABELS = {"F": "forward", "B": "backward", "S": "optimizer step",
             "G": "gradient-model update (DNI)"}
LABELLED_MINIBATCHES = 24  # minibatch numbers written inside bars: the first ones only


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (killed writer) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _epochs(run_dir: Path) -> tuple[str, list[dict]]:
    path = run_dir / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if r.get("kind") == "epoch"] if path.exists() else []
    if not records:
        raise UsageError(f"{run_dir} has no metrics.jsonl with epoch records; is it a ddgpipe "
                         "run directory?")
    return _label(run_dir), records


def _label(run_dir: Path) -> str:
    """The run's ``label`` from config.json; the directory name when there is none."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return run_dir.name
    label = config.get("label") if isinstance(config, dict) else None
    return str(label) if label else run_dir.name


def plot_learning_curves(run_dirs: list[str | Path], out_png: str | Path,
                         title: str | None = None) -> Path:
    """Training loss and test accuracy against epochs and against wall-clock time."""
    runs = [_epochs(Path(d)) for d in run_dirs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (label, records) in enumerate(runs):
        colour = f"C{i % 10}"
        epoch = [r["epoch"] for r in records]
        acc = [100 * float(r["test_acc"]) for r in records]
        axes[0].plot(epoch, [float(r["train_loss"]) for r in records], color=colour, label=label)
        axes[1].plot(epoch, acc, color=colour, marker="o", markersize=3, label=label)
        axes[2].plot([float(r["wall_time"]) for r in records], acc, color=colour, label=label)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    axes[2].set(xlabel="training time (s)", ylabel="test accuracy (%)",
                title="test accuracy vs time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_timeline(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """One row per stage, a bar per op: the picture from pipeline papers, measured."""
    run_dir = Path(run_dir)
    path = run_dir / "timeline.jsonl"
    if not path.exists():
        raise UsageError(f"{run_dir} has no timeline.jsonl; train with --timeline to record one")
    records = read_jsonl(path)
    if not records:
        raise UsageError(f"{path} is empty; train with --timeline to record one")
    origin: dict = {}
    for r in records:  # clocks of different processes are not comparable: align each rank
        key = r.get("rank")
        origin[key] = min(origin.get(key, r["start"]), r["start"])
    stages = max(r["stage"] for r in records) + 1
    span = 1000 * max(r["end"] - origin[r.get("rank")] for r in records) or 1.0
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * stages))
    for r in records:
        start = 1000 * (r["start"] - origin[r.get("rank")])
        width = 1000 * (r["end"] - r["start"])
        y = stages - 1 - r["stage"]  # stage 0 on top
        ax.broken_barh([(start, width)], (y - 0.4, 0.8), facecolors=OP_COLOURS.get(r["op"], "grey"),
                       edgecolor="white", linewidth=0.3)
        if r["minibatch"] < LABELLED_MINIBATCHES and width > span / 150:  # room for the digits
            ax.text(start + width / 2, y, str(r["minibatch"]), ha="center", va="center",
                    fontsize=6, color="white", clip_on=True)
    ax.set_yticks(range(stages), [f"stage {stages - 1 - k}" for k in range(stages)])
    ax.set_xlabel("time (ms)")
    ops = sorted({r["op"] for r in records}, key=lambda o: (o not in OP_COLOURS, "FBSG".find(o), o))
    handles = [plt.Rectangle((0, 0), 1, 1, color=OP_COLOURS.get(o, "grey")) for o in ops]
    ax.legend(handles, [OP_LABELS.get(o, o) for o in ops], loc="upper left", fontsize=8,
              bbox_to_anchor=(1.0, 1.0))  # outside the axes: never over a bar
    ax.set_title(f"pipeline timeline: {run_dir.name}")
    return _save(fig, out_png or run_dir / "timeline.png")


def plot_bench(rows: list[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Median speedup per configuration, with the min-max over rounds as error bars."""
    rows = [r for r in rows if r.get("ratio_median") is not None]  # failed configurations
    names = [str(r["name"]) for r in rows]
    med = [float(r["ratio_median"]) for r in rows]
    low = [m if r.get("ratio_min") is None else float(r["ratio_min"])
           for m, r in zip(med, rows, strict=True)]
    high = [m if r.get("ratio_max") is None else float(r["ratio_max"])
            for m, r in zip(med, rows, strict=True)]
    err = [[m - lo for m, lo in zip(med, low, strict=True)],
           [hi - m for m, hi in zip(med, high, strict=True)]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    bars = ax.bar(names, med, yerr=err, capsize=4, color="tab:blue")
    for bar, m, hi in zip(bars, med, high, strict=True):  # above the error bar
        ax.text(bar.get_x() + bar.get_width() / 2, hi + 0.02, f"{m:.2f}x",
                ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, ls="--", color="grey", label="baseline")
    ax.set_ylabel("throughput relative to the baseline")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, out_png)


def _mean_curve(run_dirs: list[Path], key: str) -> tuple[list[int], list[float]]:
    curves = [_epochs(d)[1] for d in run_dirs]
    length = min(len(c) for c in curves)
    epochs = [c["epoch"] for c in curves[0][:length]]
    mean = [sum(float(c[i][key]) for c in curves) / len(curves) for i in range(length)]
    return epochs, mean


_MARKERS = "osD^vP"


def _distinct(i: int) -> tuple[str, str]:
    """Line style and marker of a panel's i-th line: matplotlib's 10 colours repeat, so a line
    past them differs in style too."""
    return ("-", "--", ":")[(i // 10) % 3], _MARKERS[i % len(_MARKERS)]


#: one line of a panel: its label, the run directories it averages (or draws one by one), and
#: its colour and line style (None: matplotlib's next)
Line = tuple[str, list, str | None, str | None]


def plot_mean_loss_panels(panels: list[tuple[str, list[Line]]], out_png: str | Path,
                          title: str | None = None) -> Path:
    """One panel per ``(title, lines)``: each line the training loss against epochs, averaged
    over its runs (seeds); lines without runs are left out."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False,
                             sharey=True)
    for ax, (panel_title, lines) in zip(axes[0], panels, strict=True):
        for i, (label, runs, colour, style) in enumerate(line for line in lines if line[1]):
            epochs, loss = _mean_curve([Path(r) for r in runs], "train_loss")
            ls, marker = _distinct(i)
            ax.plot(epochs, loss, color=colour, ls=style or ls, marker=marker, markersize=2,
                    label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.set(xlabel="epoch", yscale="log", title=panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (mean over seeds)")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_seed_panels(panels: list[tuple[str, list[Line]]], out_png: str | Path,
                     title: str | None = None) -> Path:
    """Every run as its own curve: training loss (top row) and test accuracy (bottom row)
    against epochs, one column per ``(title, lines)``; a line's runs share its colour."""
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7.5), squeeze=False,
                             sharex="col")
    for col, (panel_title, lines) in enumerate(panels):
        for label, runs, colour, _ in lines:
            for i, run in enumerate(runs):
                records = _epochs(Path(run))[1]
                epochs = [r["epoch"] for r in records]
                name = f"{label}, seed {_seed_of(Path(run))}"
                style = dict(color=colour, alpha=0.8, lw=1.2, ls=("-", "--", ":")[i % 3],
                             marker="o", markersize=2)
                axes[0][col].plot(epochs, [float(r["train_loss"]) for r in records],
                                  label=name, **style)
                axes[1][col].plot(epochs, [100 * float(r["test_acc"]) for r in records],
                                  **style)
        axes[0][col].set(yscale="log", title=panel_title)
        axes[1][col].set(xlabel="epoch")
        for row in (0, 1):
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("test accuracy (%)")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def _seed_of(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "config.json").read_text())["seed"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return run_dir.name


#: one series of an accuracy-vs-K panel: label, colour, and (K, mean, std) points
Series = tuple[str, str | None, list[tuple[int, float, float]]]


def plot_accuracy_panels(panels: list[tuple[str, float | None, list[Series]]],
                         out_png: str | Path) -> Path:
    """Final test accuracy against K, one panel per ``(title, backprop's accuracy, series)``:
    backprop as a dashed line, each series with its seeds' standard deviation as error bars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (panel_title, bp, series) in zip(axes[0], panels, strict=True):
        all_k = sorted({k for _, _, points in series for k, _, _ in points})
        if all_k:
            ax.set_xticks(all_k)
        if bp is not None:
            ax.axhline(bp, color="C0", ls="--", label="BP")
        for i, (label, colour, points) in enumerate(s for s in series if s[2]):
            ks, acc, std = zip(*sorted(points), strict=True)
            ls, marker = _distinct(i)
            ax.errorbar(ks, acc, yerr=std, color=colour, marker=marker, ls=ls, capsize=3,
                        label=label)
        ax.set(xlabel="K (modules)", ylabel="test accuracy (%)", title=panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_png)


PAPER_COLOURS = {"bp": "C0", "ddg": "C1", "dni": "C3"}


def plot_loss_by_k(setting_dir: str | Path, stage_counts, out_png: str | Path,
                   title: str | None = None, exclude=()) -> Path:
    """One panel per K: training loss of BP, DDG and DNI (mean over seeds) against epochs;
    the run directories in ``exclude`` (runs that diverged) are left out."""
    setting_dir = Path(setting_dir)
    skip = {Path(d).resolve() for d in exclude}
    panels: list[tuple[str, list[Line]]] = []
    for k in stage_counts:
        lines: list[Line] = []
        for method, colour in PAPER_COLOURS.items():
            stages = 1 if method == "bp" else k
            runs = [r for r in sorted(setting_dir.glob(f"{method}-k{stages}-s*"))
                    if r.resolve() not in skip]
            label = "BP" if method == "bp" else f"{method.upper()} K={k}"
            lines.append((label, runs, colour, None))
        panels.append((f"K = {k}", lines))
    return plot_mean_loss_panels(panels, out_png, title)


def plot_accuracy_vs_k(summary: dict, out_png: str | Path) -> Path:
    """Final test accuracy against K per setting: DDG and DNI, backprop as the reference."""
    rows = summary["rows"]
    panels: list[tuple[str, float | None, list[Series]]] = []
    for setting in sorted({r["setting"] for r in rows}):
        mine = [r for r in rows if r["setting"] == setting]
        bp = next((r["test_acc_mean"] for r in mine if r["method"] == "bp"), None)
        series: list[Series] = [(method.upper(), colour,
                   [(r["stages"], r["test_acc_mean"], r["test_acc_std"]) for r in mine
                    if r["method"] == method])
                  for method, colour in PAPER_COLOURS.items() if method != "bp"]
        panels.append((setting, bp, series))
    return plot_accuracy_panels(panels, out_png)


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

"""Language models' curves, drawn from the eval records of ``metrics.jsonl``: held-out bits
per byte against tokens seen and against training time."""

from __future__ import annotations

from pathlib import Path

from ddgpipe.errors import UsageError
from ddgpipe.training.plots import _label, _save, plt, read_jsonl

__all__ = ["eval_records", "has_eval_records", "plot_lm_curves", "plot_lm_panels", "LMLine",
           "plot_runs", "is_language_model_run"]


def eval_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [r for r in read_jsonl(path) if r.get("kind") == "eval"] if path.exists() else []
    if not records:
        raise UsageError(f"{run_dir} has no eval records in metrics.jsonl; train with "
                         "--eval-every N (language models write them by themselves)")
    return records


def has_eval_records(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "metrics.jsonl"
    return path.exists() and any(r.get("kind") == "eval" for r in read_jsonl(path))


def _bpb(record: dict) -> float:
    return float(record.get("val_bits_per_byte", record["val_loss"]))


def plot_lm_curves(run_dirs: list[str | Path], out_png: str | Path,
                   title: str | None = None) -> Path:
    """Training loss, and held-out bits per byte against tokens and against time."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, run in enumerate(run_dirs):
        records, colour, label = eval_records(run), f"C{i % 10}", _label(Path(run))
        seen = [r.get("tokens", r["samples"]) for r in records]
        axes[0].plot(seen, [float(r["train_loss"]) for r in records], color=colour, label=label)
        axes[1].plot(seen, [_bpb(r) for r in records], color=colour, marker="o", markersize=3,
                     label=label)
        axes[2].plot([float(r["wall_time"]) for r in records], [_bpb(r) for r in records],
                     color=colour, label=label)
    axes[0].set(xlabel="tokens seen", ylabel="training loss (nats)", title="training loss")
    axes[1].set(xlabel="tokens seen", ylabel="held-out bits per byte", title="held-out loss")
    axes[2].set(xlabel="training time (s)", ylabel="held-out bits per byte",
                title="held-out loss vs time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend()
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


#: one line of a panel: label, the run directories (seeds) it averages, colour, style
LMLine = tuple[str, list, str | None, str | None]


def _mean(runs: list, x_key: str) -> tuple[list[float], list[float]]:
    curves = [eval_records(r) for r in runs]
    length = min(len(c) for c in curves)
    xs = [sum(float(c[i][x_key]) for c in curves) / len(curves) for i in range(length)]
    ys = [sum(_bpb(c[i]) for c in curves) / len(curves) for i in range(length)]
    return xs, ys


def plot_lm_panels(panels: list[tuple[str, list[LMLine]]], out_png: str | Path,
                   x_key: str = "tokens", title: str | None = None) -> Path:
    """One panel per ``(title, lines)``: held-out bits per byte, mean over each line's runs,
    against ``x_key`` (``tokens`` or ``wall_time``)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False,
                             sharey=True)
    for ax, (panel_title, lines) in zip(axes[0], panels, strict=True):
        for label, runs, colour, style in lines:
            if runs:
                xs, ys = _mean(runs, x_key)
                ax.plot(xs, ys, color=colour, ls=style or "-", marker="o", markersize=2,
                        label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.set(xlabel="tokens seen" if x_key == "tokens" else "training time (s, mean)",
               title=panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out bits per byte (mean over seeds)")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def is_language_model_run(run_dir: str | Path) -> bool:
    """Whether the run's eval records count tokens (a language model)."""
    path = Path(run_dir) / "metrics.jsonl"
    return path.exists() and any(r.get("kind") == "eval" and "tokens" in r
                                 for r in read_jsonl(path))


def plot_runs(run_dirs: list[str | Path], out_png: str | Path, title: str | None = None) -> Path:
    """The curves that fit the runs: held-out bits per byte for language models, else
    training loss and test accuracy per epoch."""
    from ddgpipe.training.plots import plot_learning_curves

    if run_dirs and all(is_language_model_run(d) for d in run_dirs):
        return plot_lm_curves(run_dirs, out_png, title)
    return plot_learning_curves(run_dirs, out_png, title)

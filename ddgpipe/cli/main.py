"""``ddgpipe train | demo | bench | experiment | plot``: the command line, built on the Python API.

Every problem a user can fix ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from ddgpipe.cli.commands import cmd_bench, cmd_experiment, cmd_plot, cmd_train
from ddgpipe.cli.config_files import with_file_settings
from ddgpipe.cli.demo import DEMO_BATCH, DEMO_TARGET, cmd_demo
from ddgpipe.cli.options import LineHelpFormatter, add_train_arguments, int_list
from ddgpipe.cli.sample import add_sample_command
from ddgpipe.cli.study_options import (
    add_bench_arguments,
    add_lm_arguments,
    add_paper_arguments,
    add_staleness_arguments,
)
from ddgpipe.errors import Terminated, UsageError, WorkerError

__all__ = ["main", "build_parser", "parse_args"]

Subcommands = argparse._SubParsersAction

DESCRIPTION = """\
Train deep networks with Decoupled Parallel Backpropagation (DDG; Huo et al., ICML 2018):
the network is cut into K modules and every module but the last learns from a delayed
gradient, so the modules need not wait for each other. Compare it with backprop (bp) and
synthetic gradients (dni, Jaderberg et al. 2017)."""



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddgpipe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_train_command, _demo_command, _bench_command, _experiment_command,
                _plot_command, add_sample_command):
        add(sub)
    return parser


def _train_command(sub: Subcommands) -> None:
    p = sub.add_parser("train", help="train one model with bp, ddg or dni",
                       description="Train one model and write metrics to RUN_DIR.",
                       formatter_class=LineHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train, train_parser=p)


def _demo_command(sub: Subcommands) -> None:
    p = sub.add_parser("demo", help="DDG against backprop on the embedded digits: speed, time "
                       "to accuracy, a plot",
                       description="Train backprop (on every core) and DDG K=2 (a thread per "
                       "stage, at the cut this machine times fastest) on the same data and "
                       "seed; print test accuracy, the training time to --target test "
                       "accuracy, images/s and the ratio to backprop, and plot the curves.")
    add_train_arguments(p, defaults_for_demo=True)
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH,
                   help="minibatch size (default: %(default)s)")
    p.add_argument("--target", type=float, default=DEMO_TARGET, metavar="ACC",
                   help="the test accuracy whose training time is reported (default: "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed shared by all runs (default: "
                   "%(default)s)")
    p.add_argument("--stages", type=int_list, default=[2], metavar="K1,K2",
                   help="DDG stage counts to compare with backprop (default: 2; more stages "
                        "than cores share them)")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="parent folder of the runs and the plot; a new demo replaces the "
                        "runs of the last one (default: %(default)s)")
    p.add_argument("--dni", action="store_true", help="also train the synthetic-gradient "
                   "baseline (DNI) at the largest K")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_demo)


def _bench_command(sub: Subcommands) -> None:
    p = sub.add_parser("bench", help="throughput of DDG against backprop, DDP and GPipe/1F1B",
                       description="Measure images/s of every configuration on the same model, "
                       "batch and step count, interleaved in rounds (A B C ... A B C ...) so a "
                       "noisy machine affects them alike; report per-round ratios to backprop "
                       "with one thread, a table, bench.json, bench.png and the cost model's "
                       "prediction.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


def _experiment_command(sub: Subcommands) -> None:
    p = sub.add_parser("experiment", help="grids of runs with a report: the paper's claims "
                       "(paper), staleness compensation compared (staleness)",
                       description="Train a grid of runs, two at a time with one thread each, "
                       "then write results.md, summary.json and figures from the runs' files. "
                       "Running the same command again skips the runs that finished.")
    experiments = p.add_subparsers(dest="experiment", metavar="NAME", required=True,
                                   help="the experiment to run: paper, staleness or lm")
    add_paper_arguments(experiments.add_parser(
        "paper", help="BP vs DDG vs DNI under the paper's stochastic methods and momentum SGD",
        description="Train backprop, DDG and DNI at K = 2, 3, 4 with several seeds under the "
        "paper's two stochastic methods (constant and diminishing step size) and momentum SGD, "
        "then write results.md, summary.json and figures. About 8 minutes on 2 cores; --quick "
        "takes about one."))
    add_staleness_arguments(experiments.add_parser(
        "staleness", help="staleness compensations against plain DDG and backprop, momentum SGD",
        description="With momentum SGD and backprop's hyperparameters unchanged for every "
        "method and K, train backprop, plain DDG, DDG with each staleness compensation (sc, "
        "lwp, dc, pipemare-lr, delay-lr, accumulate, stage-momentum), with sc,lwp, with FDG's "
        "gradient shrinking (beta 0.5), Features Replay and FR + pipemare, at K = 2, 3, 4, 8 "
        "on ResNet-56/digits and ResNet-20-1D/mnist1d, 3 seeds (part main); plain DDG at lr "
        "0.05, 0.025, 0.0125 (sweep); backprop and plain DDG with 3x the epochs at K = 4, "
        "first seed (budget). Writes results.md (tables per benchmark and K, gaps to backprop, "
        "the goals each method meets), summary.json and figures. The full grid is 346 runs, "
        "about 7 core-hours: about 3.5 hours with 2 workers on 2 cores. An interrupted grid "
        "continues where it stopped when the same command is run again. --quick takes well "
        "under a minute."))
    add_lm_arguments(experiments.add_parser(
        "lm", help="DDG on a GPT language model against tuned backprop, over several horizons",
        description="Train a GPT (gpt-8, width 128) on the Shakespeare corpus at several "
        "horizons (800, 3200, 12800 iterations of 16 x 128 tokens, each with its own warm-up "
        "and cosine): AdamW backprop at several learning rates (0.5x to 16x 1e-3; the best "
        "is every gap's baseline), per-minibatch and microbatched DDG (M = 2, 4, 8) at rates "
        "of its own, with and without Adam weight prediction (wp), AsyncPP's recipe and Muon, "
        "at K = 2, 4, 8. Writes results.md (held-out loss in nats per byte, "
        "gaps in % of the best backprop, iso-loss step ratios, the goals), summary.json and "
        "figures (gap against horizon, loss curves). About 7 minutes of one core per 800 "
        "iterations; --plan-only prints what is left. Backprop runs first; an interrupted "
        "grid continues where it stopped when the same command is run again."))
    p.set_defaults(func=cmd_experiment)


def _plot_command(sub: Subcommands) -> None:
    p = sub.add_parser("plot", help="learning curves (or a pipeline timeline) from run dirs",
                       description="Draw PNG plots from the metrics files of finished runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    p.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/curves.png or "
                   "RUN_DIR/timeline.png)")
    p.add_argument("--timeline", action="store_true",
                   help="draw the pipeline timeline recorded with `train --timeline`")
    p.set_defaults(func=cmd_plot)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, over ``train``'s settings from a file, a resumed run and a preset."""
    args = parser.parse_args(argv)
    if args.command == "train":
        args = with_file_settings(parser, args.train_parser, argv, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
        return args.func(args)
    except UsageError as e:
        print(f"ddgpipe: error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"ddgpipe: error: worker {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ddgpipe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("ddgpipe: terminated (SIGTERM); every worker was stopped", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())

"""``ddgpipe train | demo | bench | experiment | plot``: the command line, built on the Python API.

Every problem a user can fix ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ddgpipe.errors import UsageError, WorkerError

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
Train deep networks with Decoupled Parallel Backpropagation (DDG; Huo et al., ICML 2018):
the network is cut into K modules and every module but the last learns from a delayed
gradient, so the modules need not wait for each other. Compare it with backprop (bp) and
synthetic gradients (dni, Jaderberg et al. 2017)."""


PRESETS = {
    "paper-cifar": dict(data="cifar10", batch_size=128, optimizer="sgd", momentum=0.9,
                        weight_decay=5e-4, lr=0.1, lr_schedule="multistep",
                        milestones=[150, 225], lr_gamma=0.1, epochs=300),
}


class LineHelpFormatter(argparse.HelpFormatter):
    """Keeps the line breaks of a help text that has them (one line per compensation)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        if "\n" not in text:
            return super()._split_lines(text, width)
        return [part for line in text.splitlines()
                for part in (textwrap.wrap(line, width, subsequent_indent="    ") or [""])]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_train_arguments(p: argparse.ArgumentParser, defaults_for_demo: bool = False) -> None:
    from ddgpipe.data import DATASET_NAMES
    from ddgpipe.devices import DEVICE_CHOICES
    from ddgpipe.distributed import COMMS
    from ddgpipe.methods.build import EXECUTORS
    from ddgpipe.models import MODEL_NAMES
    from ddgpipe.optim import LR_SCHEDULES, OPTIMIZERS
    from ddgpipe.precision import PRECISIONS
    from ddgpipe.stash import STASH_MODES

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet20", metavar="NAME",
                   help=f"network: {', '.join(MODEL_NAMES)} (CIFAR ResNets of He et al. 2016 "
                        "with option-A shortcuts; resnet1d-N: the same with 1-D convolutions, "
                        "for mnist1d; or an MLP) (default: %(default)s)")
    g.add_argument("--data", default="digits", metavar="NAME",
                   help=f"data set: {', '.join(DATASET_NAMES)}; digits is scikit-learn's 1797 "
                        "handwritten 8x8 digits, embedded; mnist1d is MNIST-1D (Greydanus "
                        "2020), 1 x 40 signals generated offline on first use and cached in "
                        "$DDGPIPE_CACHE (default ~/.cache/ddgpipe); cifar10/cifar100 need "
                        "--data-dir; synthetic is random data for throughput only (default: "
                        "%(default)s)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the "
                        "extracted official python archives)")
    if defaults_for_demo:
        return
    g = p.add_argument_group("method")
    g.add_argument("--method", default="bp", metavar="NAME",
                   help="bp: backpropagation; ddg: decoupled parallel backprop (Huo, Gu, Yang, "
                        "Huang, ICML 2018); fr: Features Replay (Huo, Gu, Huang, NeurIPS 2018), "
                        "DDG's schedule replaying each delayed forward with current weights "
                        "(= ddg --stash none); dni: synthetic gradients (Jaderberg et al., ICML "
                        "2017) (default: %(default)s)")
    g.add_argument("--stages", type=int, default=None, metavar="K",
                   help="number of modules K the network is cut into (default: 1 for bp, "
                        "2 otherwise)")
    g.add_argument("--stash", default="graph", metavar="MODE",
                   help=f"ddg weight stashing: {', '.join(STASH_MODES)}; graph keeps the "
                        "autograd graph (exact, most memory), recompute keeps the input and "
                        "weight version and reruns the forward (exact), none replays with "
                        "current weights (approximate) (default: %(default)s)")
    g.add_argument("--split", type=_int_list, metavar="I,J",
                   help="cut points by block index, e.g. 4,8 makes blocks [0,4) [4,8) [8,end); "
                        "default: balance by --balance")
    g.add_argument("--balance", default=None, choices=("params", "flops", "time", "pipeline"),
                   help="how to cut the network when --split is not given: params "
                        "(parameter count), flops (counted floating-point operations of each "
                        "block's forward+backward), time (each block profiled), or pipeline: "
                        "the profiled cut and each cut one block away run for a few clocks on "
                        "copies of the model, and the fastest is kept (seconds to a minute at "
                        "start-up). Default: the cut this machine timed before for the same "
                        "model, batch shape, schedule, executor and devices (kept in the "
                        "cache folder, $DDGPIPE_CACHE), timed once when there is none, so the "
                        "same command and seed give the same numbers; --balance pipeline "
                        "times it again. The reference executor uses the threaded executor's "
                        "cut. The cut used is saved as split in RUN_DIR/config.json; pass it "
                        "back with --split to repeat a run on another machine")
    g.add_argument("--grad-shrink", type=float, default=1.0, metavar="BETA",
                   help="scale stage k's delayed gradient by BETA**delay (gradient shrinking, "
                        "from the authors' follow-up, Fully Decoupled Neural Network Learning "
                        "Using Delayed Gradients, Zhuang et al. 2019); 1 is DDG "
                        "(default: %(default)s)")
    from ddgpipe.compensation import COMPENSATIONS

    g.add_argument("--compensation", metavar="NAME[,NAME]",
                   help="for --method ddg/fr, comma-separated; default none:\n" + "\n".join(
                            f"  {name}: {line}" for name, line in COMPENSATIONS.items()))
    g.add_argument("--dc-lambda", type=float, metavar="LAMBDA",
                   help="dc: lambda_0 of the adaptive lambda (default 2); dc-c: the constant "
                        "lambda (default 0.04)")
    g.add_argument("--dc-decay", type=float, metavar="BETA",
                   help="dc: decay of the gradient's mean square (default 0.95)")
    g.add_argument("--pipemare-anneal", type=int, metavar="CLOCKS",
                   help="pipemare, pipemare-lr: clocks (minibatches) over which each stage's "
                        "lr ramps from lr/delay to lr (default: one epoch; PipeMare tunes it)")
    g.add_argument("--pipemare-ema", type=float, metavar="GAMMA",
                   help="pipemare: decay of the moving average of weight updates that "
                        "estimates the forward's weights (default 0.9)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=15, help="passes over the training set "
                   "(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="minibatch size; with "
                   "--replicas R the global one, split into R equal shards (default: "
                   "%(default)s)")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="sgd (with --momentum, --nesterov) or adam (default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.1, help="base learning rate (default: "
                   "%(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; 0 is plain SGD "
                   "as in the paper's analysis (default: %(default)s)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay "
                   "(default: %(default)s)")
    g.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="constant; multistep (x --lr-gamma at --milestones epochs); sqrt: "
                        "lr/sqrt(1+t) and inverse: lr/(1+t), the diminishing step sizes, t in "
                        "epochs; cosine (default: %(default)s)")
    g.add_argument("--milestones", type=_int_list, default=[], metavar="E1,E2",
                   help="epochs at which multistep multiplies the lr by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="multistep factor (default: "
                   "%(default)s)")
    g.add_argument("--warmup-epochs", type=int, default=0, metavar="N",
                   help="multiply the lr by --warmup-factor for the first N epochs (He et al.'s "
                        "ResNet-110 recipe) (default: %(default)s)")
    g.add_argument("--warmup-factor", type=float, default=0.1, help="lr multiplier during the "
                   "warm-up epochs (default: %(default)s)")
    g.add_argument("--preset", choices=tuple(PRESETS), help="a documented recipe; flags given "
                   "explicitly override it. paper-cifar: the DDG paper's CIFAR schedule (data "
                   "cifar10, batch 128, SGD momentum 0.9, weight decay 5e-4, lr 0.1 x0.1 at "
                   "epochs 150 and 225, 300 epochs, crop+flip; lr 0.01 for the first epoch of "
                   "resnet110)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and "
                   "augmentation; same seed, same numbers (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch intra-op threads per stage (default: "
                   "this machine's cores divided by the number of stages)")
    g.add_argument("--out", metavar="RUN_DIR", help="write config.json and metrics.jsonl here "
                   "(default: runs/<method>-k<K>-s<seed>)")
    g.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="also log the training loss every N iterations (default: epochs only)")
    g.add_argument("--timeline", action="store_true",
                   help="record every op's start/end to RUN_DIR/timeline.jsonl for "
                        "`ddgpipe plot --timeline`")
    g.add_argument("--label", help="name shown in tables and plots (default: e.g. 'DDG K=4')")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a checkpoint every N iterations into RUN_DIR/checkpoints: "
                        "weights, optimizer, LR schedule, RNG, data position and the "
                        "in-flight pipeline, written atomically (default: 0, never)")
    g.add_argument("--checkpoint-every-epochs", type=int, default=0, metavar="N",
                   help="save a checkpoint after every N epochs (default: 0, never)")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="save a checkpoint and stop cleanly after N iterations in all (for "
                        "time-limited jobs); continue with --resume")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest complete checkpoint; give "
                        "the same settings as the run that wrote it (checked). The resumed run "
                        "ends with bitwise the weights of an uninterrupted one")
    g = p.add_argument_group("executors and devices")
    g.add_argument("--executor", default=None, choices=EXECUTORS,
                   help="threads: one thread per stage in this process (the default for "
                        "--stages 2 or more); reference: every stage in turn on one thread, "
                        "clock by clock (the spec: for debugging and timelines; bitwise the "
                        "same numbers as threads); processes: one process per stage spawned "
                        "here (gloo on 127.0.0.1, or nccl on GPUs). Under torchrun every rank "
                        "runs one stage (processes) whatever this says")
    g.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="data parallelism across pipelines: R copies of the K-stage pipeline, "
                        "each on 1/R of every minibatch, the copies of a stage averaging their "
                        "gradients before each step; K x R processes (--executor processes "
                        "spawns them here; under torchrun, launch K x R ranks: rank r*K + k "
                        "runs stage k of replica r). Implies --executor processes. --method ddg "
                        "or fr (default: %(default)s)")
    g.add_argument("--launcher", default=None, choices=("none", "local"),
                   help=argparse.SUPPRESS)  # replaced by --executor processes; still accepted
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where to compute: {DEVICE_CHOICES}; auto is CUDA when available, "
                        "cuda spreads the stages over the GPUs (stage k on cuda:k mod count). "
                        "Under torchrun each rank uses cuda:LOCAL_RANK (default: %(default)s)")
    g.add_argument("--devices", type=_str_list, metavar="D0,D1",
                   help="one device per stage, e.g. cuda:0,cuda:1 (overrides --device)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; bf16: autocast to bfloat16 in every stage; fp16: autocast to "
                        "float16 with dynamic loss scaling, the scale travelling with each "
                        "minibatch's delayed gradient (default: %(default)s)")
    g.add_argument("--comm", default="auto", choices=COMMS,
                   help="--executor processes/torchrun on GPUs: auto sends GPU tensors with "
                        "nccl; host stages them through host memory over gloo (needed when "
                        "several ranks share one GPU, which nccl refuses) (default: "
                        "%(default)s)")
    g.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long a stage waits for a peer before the run stops with an "
                        "error (default: %(default)s)")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from ddgpipe.models import MODEL_NAMES

    p.add_argument("--model", default="resnet20", metavar="NAME",
                   help=f"network: {', '.join(MODEL_NAMES)} (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="global minibatch size, the "
                   "same for every configuration (default: %(default)s)")
    p.add_argument("--stages", type=int, default=2, metavar="K",
                   help="workers: DDG/pipeline stages, DDP ranks, backprop threads "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration and "
                   "round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones "
                   "(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; ratios are "
                   "medians over rounds (default: %(default)s)")
    p.add_argument("--microbatches", type=_int_list, default=[2, 4, 8], metavar="M1,M2",
                   help="microbatch counts tried for GPipe and 1F1B (default: 2,4,8)")
    p.add_argument("--configs", type=lambda t: [c for c in t.split(",") if c], metavar="A,B",
                   help="run only these configurations, e.g. bp-1t,ddg-graph (default: all)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic input height and "
                   "width (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="with R >= 2, also run DDG with K stages x R replicas on the process "
                        "runtime: ddg-graph-kKr1, ddg-graph-k1rR (one stage, R replicas: "
                        "data parallelism through DDG's code) and ddg-graph-kKrR; rows with "
                        "more processes than cores are reported as oversubscribed "
                        "(default: %(default)s)")
    p.add_argument("--link-gbps", type=float, default=None, metavar="GBIT_S",
                   help="link bandwidth for the cost model's predictions (default: "
                        "communication is free and overlapped; the K x R predictions, which "
                        "a free link would make perfect, assume 10)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu, or cuda: every configuration on GPUs (stage or rank k on cuda:k "
                        "mod count; DDP and torch's pipelines only with K GPUs), timed with "
                        "CUDA events, with each GPU's peak memory (default: %(default)s)")
    p.add_argument("--out", default="runs/bench", metavar="DIR", help="where bench.json and "
                   "bench.png go (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the per-run progress lines")


def add_paper_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small smoke version (ResNet-20, "
                   "2 epochs, one seed, K = 2 and 4, constant step size)")
    p.add_argument("--model", help="override the network (default: resnet56; quick: resnet20)")
    p.add_argument("--epochs", type=int, help="override the epochs per run (default: 15)")
    p.add_argument("--seeds", type=_int_list, metavar="S1,S2", help="override the seeds "
                   "(default: 0,1,2)")
    p.add_argument("--stages", type=_int_list, metavar="K1,K2", help="override the K values "
                   "(default: 2,3,4)")
    p.add_argument("--grad-shrink", type=float, default=1.0, metavar="BETA",
                   help="gradient shrinking for the DDG runs (FDG, Huo et al.): scale stage "
                        "k's delayed gradient by BETA**delay (default: 1, plain DDG)")
    p.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread "
                   "each (default: %(default)s)")
    p.add_argument("--out", default="runs/paper", metavar="DIR", help="where runs, "
                   "results.md and figures go (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the per-run lines")


def add_staleness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke version: one seed, K = 2 and 4, BP, DDG and DDG + sc,lwp "
                        "(sweep: lr 0.05 and 0.025), ResNet-20 on digits and ResNet-20-1D on "
                        "mnist1d, one epoch at batch 128 (2 for the budget part); 20 runs")
    p.add_argument("--seeds", type=_int_list, metavar="S1,S2",
                   help="seeds of every run (default: 0,1,2; quick: 0)")
    p.add_argument("--stages", type=_int_list, metavar="K1,K2",
                   help="the K values, each >= 2 and at most the model's block count; "
                        "backprop is always run (default: 2,3,4,8; quick: 2,4)")
    p.add_argument("--benchmarks", type=_str_list, metavar="B1,B2",
                   help="digits (ResNet-56, 15 epochs) and/or mnist1d (ResNet-20-1D, 30 "
                        "epochs) (default: digits,mnist1d)")
    p.add_argument("--parts", type=_str_list, metavar="P1,P2",
                   help="main: every method at backprop's hyperparameters; sweep: plain DDG at "
                        "lr 0.05, 0.025, 0.0125; budget: backprop and plain DDG with 3x the "
                        "epochs (at --budget-stages, on --budget-seeds seeds). Each part also "
                        "trains the backprop runs its gaps need; runs shared by parts are "
                        "trained once (default: main,sweep,budget)")
    p.add_argument("--budget-stages", type=_int_list, metavar="K1,K2",
                   help="the K values of the budget part; a long run costs as much as 3 short "
                        "ones (default: 4; quick: 2,4)")
    p.add_argument("--budget-seeds", type=int, metavar="N",
                   help="the budget part trains the first N of --seeds; its table compares "
                        "every method on those seeds only (default: 1)")
    p.add_argument("--workers", type=int, default=2,
                   help="runs trained at once, each a process with one torch thread on the "
                        "reference executor (default: %(default)s)")
    p.add_argument("--out", default="runs/staleness", metavar="DIR",
                   help="where the runs (DIR/BENCHMARK/METHOD/kK-sSEED), results.md, "
                        "summary.json and figures go; runs already finished there with the "
                        "same settings are skipped (default: %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write results.md, summary.json and the figures from "
                        "the runs finished so far in --out, naming the missing ones")
    p.add_argument("--no-progress", action="store_true", help="hide the per-run lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddgpipe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train one model with bp, ddg or dni",
                       description="Train one model and write metrics to RUN_DIR.",
                       formatter_class=LineHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="DDG against backprop on the embedded digits, with a plot",
                       description="Train backprop, DDG K=2, DDG K=4 and DNI K=4 on the same "
                       "data and seed, print their test accuracy side by side and plot the "
                       "curves.")
    add_train_arguments(p, defaults_for_demo=True)
    p.add_argument("--epochs", type=int, default=15, help="epochs per run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed shared by all runs (default: "
                   "%(default)s)")
    p.add_argument("--stages", type=_int_list, default=[2, 4], metavar="K1,K2",
                   help="DDG stage counts to compare with backprop (default: 2,4)")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="parent folder of the runs and the plot (default: %(default)s)")
    p.add_argument("--no-dni", action="store_true", help="skip the synthetic-gradient (DNI) run "
                   "at the largest K")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="throughput of DDG against backprop, DDP and GPipe/1F1B",
                       description="Measure images/s of every configuration on the same model, "
                       "batch and step count, interleaved in rounds (A B C ... A B C ...) so a "
                       "noisy machine affects them alike; report per-round ratios to backprop "
                       "with one thread, a table, bench.json, bench.png and the cost model's "
                       "prediction.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("experiment", help="grids of runs with a report: the paper's claims "
                       "(paper), staleness compensation compared (staleness)",
                       description="Train a grid of runs, two at a time with one thread each, "
                       "then write results.md, summary.json and figures from the runs' files. "
                       "Running the same command again skips the runs that finished.")
    experiments = p.add_subparsers(dest="experiment", metavar="NAME", required=True,
                                   help="the experiment to run: paper or staleness")
    add_paper_arguments(experiments.add_parser(
        "paper", help="BP vs DDG vs DNI under the paper's stochastic methods and momentum SGD",
        description="Train backprop, DDG and DNI at K = 2, 3, 4 with several seeds under the "
        "paper's two stochastic methods (constant and diminishing step size) and momentum SGD, "
        "then write results.md, summary.json and figures. About 8 minutes on 2 cores; --quick "
        "takes about one."))
    add_staleness_arguments(experiments.add_parser(
        "staleness", help="staleness compensations against plain DDG and backprop, momentum SGD",
        description="With momentum SGD and backprop's hyperparameters unchanged for every "
        "method and K, train backprop, plain DDG, DDG with each staleness compensation (sc, lwp, "
        "dc, pipemare-lr), with sc,lwp, with FDG's gradient shrinking (beta 0.5), Features "
        "Replay and FR + pipemare, at K = 2, 3, 4, 8 on ResNet-56/digits and "
        "ResNet-20-1D/mnist1d, 3 seeds (part main); plain DDG at lr 0.05, 0.025, 0.0125 "
        "(sweep); backprop and plain DDG with 3x the epochs at K = 4, first seed (budget). "
        "Writes results.md (tables per benchmark and K, gaps to backprop, the goals each method "
        "meets), summary.json and figures. The full grid is 274 runs, about 5.6 core-hours: "
        "about 3 hours with 2 workers on 2 cores. An interrupted grid continues where it "
        "stopped when the same command is run again. --quick takes well under a minute."))
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("plot", help="learning curves (or a pipeline timeline) from run dirs",
                       description="Draw PNG plots from the metrics files of finished runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    p.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/curves.png or "
                   "RUN_DIR/timeline.png)")
    p.add_argument("--timeline", action="store_true",
                   help="draw the pipeline timeline recorded with `train --timeline`")
    p.set_defaults(func=cmd_plot)
    return parser


def config_from_args(args: argparse.Namespace):
    from ddgpipe.train import TrainConfig

    stages = args.stages if args.stages is not None else (1 if args.method == "bp" else 2)
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UsageError(f"--resume {args.resume} continues in that directory; drop --out or "
                         "make it the same")
    out = args.resume or args.out or f"runs/{args.method}-k{stages}-s{args.seed}"
    executor = args.executor
    if args.replicas > 1 and executor is None:  # replicas live in processes of their own
        executor = "processes"
    if args.launcher == "local":  # the old spelling of --executor processes
        if executor not in (None, "processes"):
            raise UsageError(f"--launcher local means --executor processes; it contradicts "
                             f"--executor {executor}: drop --launcher")
        print("ddgpipe: note: --launcher local is now --executor processes", file=sys.stderr)
        executor = "processes"
    return TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, method=args.method,
        stages=stages, replicas=args.replicas, stash=args.stash, split=args.split,
        balance=args.balance,
        grad_shrink=args.grad_shrink, compensation=args.compensation,
        compensation_options=_compensation_options(args),
        epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
        milestones=args.milestones, lr_gamma=args.lr_gamma, seed=args.seed,
        warmup_epochs=args.warmup_epochs, warmup_factor=args.warmup_factor,
        threads=args.threads, log_every=args.log_every, timeline=args.timeline,
        label=args.label, out=out, progress=not args.no_progress, executor=executor,
        device=args.device, devices=args.devices, precision=args.precision, comm=args.comm,
        timeout_s=args.timeout, checkpoint_every=args.checkpoint_every,
        checkpoint_every_epochs=args.checkpoint_every_epochs, stop_after=args.stop_after,
        resume=args.resume,
    )


def _compensation_options(args: argparse.Namespace) -> dict | None:
    """The hyperparameter flags given, by option name; None when none was."""
    given = {"dc_lambda": args.dc_lambda, "dc_decay": args.dc_decay,
             "pipemare_anneal": args.pipemare_anneal, "pipemare_ema": args.pipemare_ema}
    return {k: v for k, v in given.items() if v is not None} or None


def format_results(results) -> str:
    """A small table a person can read: method, test accuracy, loss, time, throughput."""
    rows = [("method", "test acc", "test loss", "train loss", "train time", "images/s")]
    for r in results:
        rows.append((r.label, f"{100 * r.test_acc:.2f}%", f"{r.test_loss:.4f}",
                     f"{r.train_loss:.4f}", f"{r.train_time_s:.1f}s", f"{r.images_per_s:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from ddgpipe.launch import init_from_env, process_backend, run_workers, under_torchrun
    from ddgpipe.plots import plot_learning_curves
    from ddgpipe.train import prepare_out_dir, train, train_worker

    config = config_from_args(args)
    config.validate()
    if config.executor == "processes" and not under_torchrun():
        # Fail here, before spawning, if it is not writable.
        prepare_out_dir(config.out, keep=config.resume is not None)
        result = run_workers(train_worker, config.stages * config.replicas, (config,),
                             peer_timeout_s=config.timeout_s, threads=config.threads,
                             backend=process_backend(config.device, config.devices,
                                                     config.comm))[-1]
    elif init_from_env(config.timeout_s, backend=process_backend(config.device, None,
                                                                  config.comm)):
        try:
            result = train(config)
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()
        if result is None:
            return 0  # only the last stage's rank reports
    else:
        result = train(config)
    if result.stopped:
        return 0
    print(format_results([result]))
    png = plot_learning_curves([result.run_dir], Path(result.run_dir) / "curves.png")
    print(f"metrics: {Path(result.run_dir) / 'metrics.jsonl'}\nplot:    {png}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ddgpipe.plots import plot_learning_curves
    from ddgpipe.train import TrainConfig, train

    if any(k < 2 for k in args.stages):
        raise UsageError(f"--stages for the demo must be >= 2 (got {args.stages}); "
                         "K=1 is backprop, which the demo always runs")
    out = Path(args.out)
    runs = [("bp", 1)] + [("ddg", k) for k in args.stages]
    if not args.no_dni:
        runs.append(("dni", max(args.stages)))
    results = []
    for method, k in runs:
        # The demo compares accuracy: a cut by parameter count is the same on every machine,
        # so its table is too (a timed cut is this machine's).
        config = TrainConfig(model=args.model, data=args.data, data_dir=args.data_dir,
                             method=method, stages=k, epochs=args.epochs, seed=args.seed,
                             balance="params", out=str(out / f"{method}-k{k}"),
                             progress=not args.no_progress)
        print(f"training {config.display_label()} ({args.model} on {args.data}, "
              f"{args.epochs} epochs) ...", flush=True)
        results.append(train(config))
    print()
    print(format_results(results))
    png = plot_learning_curves([r.run_dir for r in results], out / "curves.png",
                               title=f"{args.model} on {args.data}: backprop, DDG and DNI")
    print(f"\nlearning curves: {png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import math

    from ddgpipe.bench import BenchConfig, format_bench_table, run_bench
    from ddgpipe.bench.predict import predict_measured, predict_scaling, predicted_stage_ms
    from ddgpipe.train import prepare_out_dir

    out = prepare_out_dir(args.out)
    config = BenchConfig(model=args.model, batch_size=args.batch_size, stages=args.stages,
                         steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                         microbatches=tuple(args.microbatches),
                         configs=tuple(args.configs) if args.configs else None,
                         image_size=args.image_size, device=args.device,
                         replicas=args.replicas)
    if args.link_gbps is not None and not args.link_gbps > 0:
        raise UsageError(f"--link-gbps must be > 0 (got {args.link_gbps})")
    bandwidth = math.inf if args.link_gbps is None else args.link_gbps * 1e9 / 8
    result = run_bench(config, out_dir=out, progress=not args.no_progress)
    scaling = predict_scaling(config.model, config.batch_size, config.image_size,
                              config.in_channels, config.num_classes,
                              bandwidth_bytes_per_s=bandwidth, seed=config.seed)
    measured, per_stage = [], {}
    for row in result["rows"]:
        split = result["split_threads"] if row.get("kind") == "ddg-threads" else result["split"]
        if row.get("kind") not in ("ddg", "ddg-threads") or row.get("error") or split is None:
            continue
        cuts = [0, *split, scaling["blocks"]]
        sent = [scaling["activation_bytes"][c - 1] for c in cuts[1:]]
        if (p := predict_measured(row, config.batch_size, sent, bandwidth)):
            measured.append(p)
        per_stage[",".join(map(str, split))] = predicted_stage_ms(scaling["block_ms"], split)
    result["cost_model"] = {"measured": measured, "scaling": scaling,
                            "predicted_stage_ms": per_stage}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_bench_table(result))
    print("\ncost model (schedule simulation):")
    for cut, stage_ms in per_stage.items():
        for k, (f, b) in enumerate(stage_ms):
            print(f"  cut [{cut}] stage {k}: predicted F {f:.1f} ms  B {b:.1f} ms per clock "
                  "(one-thread block profile; measured above)")
    for m in measured:
        print(f"  {m['name']:<22} predicted {m['predicted_images_per_s']:7.0f} img/s from its "
              f"stage times, measured {m['measured_images_per_s']:7.0f} "
              f"({100 * m['measured_over_predicted']:.0f}%)")
    for row in scaling["rows"]:
        print(f"  K={row['stages']:<3} predicted {row['speedup_vs_bp_1t']:.2f}x bp-1t "
              f"({row['images_per_s']:.0f} img/s, cut {row['split']}) with K free cores")
    link_gbps = scaling["replica_link_bytes_per_s"] * 8 / 1e9
    print(f"  K x R with K x R free devices, each replica on 1/R of batch {config.batch_size} "
          f"(compute assumed linear in the batch), activations and gradient averages (ring "
          f"all-reduce, overlapped with the backward) over {link_gbps:g} Gbit/s links:")
    for row in scaling["replica_rows"]:
        print(f"  K={row['stages']:<2} x R={row['replicas']:<3} ({row['devices']:>3} devices) "
              f"predicted {row['speedup_vs_bp_1t']:6.2f}x bp-1t "
              f"({row['images_per_s']:.0f} img/s, clock {row['clock_ms']:.2f} ms)")
    print(f"\nresults: {out / 'bench.json'}\nplot:    {out / 'bench.png'}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.experiment == "staleness":
        return cmd_staleness(args)
    from ddgpipe.experiments.paper import paper_plan, run_experiment

    plan = paper_plan(quick=args.quick)
    for field, value in (("model", args.model), ("epochs", args.epochs)):
        if value is not None:
            setattr(plan, field, value)
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    if args.stages:
        if any(k < 2 for k in args.stages):
            raise UsageError(f"--stages must all be >= 2 (got {args.stages}); backprop is "
                             "always run")
        plan.stage_counts = tuple(args.stages)
    if plan.epochs < 1:
        raise UsageError(f"--epochs must be >= 1 (got {plan.epochs})")
    if not 0.0 < args.grad_shrink <= 1.0:
        raise UsageError(f"--grad-shrink must be in (0, 1] (got {args.grad_shrink})")
    plan.grad_shrink = args.grad_shrink
    plan.workers = args.workers
    from ddgpipe.models import build_model

    build_model(plan.model)  # an unknown model fails here, not in every worker
    run_experiment(plan, args.out, progress=not args.no_progress)
    return _print_report(Path(args.out))


def cmd_staleness(args: argparse.Namespace) -> int:
    from ddgpipe.experiments.staleness import run_staleness, staleness_plan

    plan = staleness_plan(quick=args.quick)
    for field, value in (("seeds", args.seeds), ("stage_counts", args.stages),
                         ("benchmarks", args.benchmarks), ("parts", args.parts),
                         ("budget_stages", args.budget_stages)):
        if value is not None:
            setattr(plan, field, tuple(value))
    if args.budget_seeds is not None:
        plan.budget_seeds = args.budget_seeds
    plan.workers = args.workers
    run_staleness(plan, args.out, progress=not args.no_progress, report_only=args.report_only)
    return _print_report(Path(args.out))


def _print_report(out: Path) -> int:
    print((out / "results.md").read_text())
    print(f"report:  {out / 'results.md'}\nsummary: {out / 'summary.json'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ddgpipe.plots import plot_learning_curves, plot_timeline

    if args.timeline:
        for run in args.run_dirs:
            print(plot_timeline(run, args.out if len(args.run_dirs) == 1 else None))
        return 0
    out = args.out or Path(args.run_dirs[0]) / "curves.png"
    print(plot_learning_curves(args.run_dirs, out))
    return 0


def _apply_preset(parser, argv, args):
    """Reparse with the preset as defaults, so flags the user typed still win."""
    values = dict(PRESETS[args.preset])
    model = args.model
    if args.preset == "paper-cifar" and model == "resnet110":
        values["warmup_epochs"] = 1
    train_parser = next(a for a in parser._actions if a.dest == "command").choices["train"]
    saved = {k: train_parser.get_default(k) for k in values}
    train_parser.set_defaults(**values)
    try:
        return parser.parse_args(argv)
    finally:
        train_parser.set_defaults(**saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        args = _apply_preset(parser, argv, args)
    try:
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


if __name__ == "__main__":
    sys.exit(main())

"""The flags of ``bench`` and of each ``experiment``: one function per command."""

from __future__ import annotations

import argparse

from ddgpipe.cli.options import int_list, str_list

__all__ = ["add_bench_arguments", "add_paper_arguments", "add_staleness_arguments",
           "add_lm_arguments"]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from ddgpipe.bench.config import OPTIMIZERS
    from ddgpipe.models import MODEL_NAMES

    p.add_argument("--model", default="resnet20", metavar="NAME",
                   help=f"network: {', '.join(MODEL_NAMES)}, or FILE.py:FACTORY / "
                        "package.module:FACTORY returning an nn.Sequential for images of "
                        "--in-channels x --image-size^2 (default: %(default)s)")
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
    p.add_argument("--microbatches", type=int_list, default=[2, 4, 8], metavar="M1,M2",
                   help="microbatch counts tried for GPipe and 1F1B (default: 2,4,8)")
    p.add_argument("--configs", type=lambda t: [c for c in t.split(",") if c], metavar="A,B",
                   help="run only these configurations, e.g. bp-1t,ddg-graph-threads; a DDG "
                        "row ending in +COMP runs with that staleness compensation, e.g. "
                        "ddg-m4+wp, or ddg-graph-threads+sc+lwp for sc,lwp (default: all)")
    p.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZERS),
                   help="what every row steps with: sgd (lr 0.05, momentum 0.9) or adamw "
                        "(lr 1e-3, betas 0.9, 0.95, weight decay 0.1: the lm study's recipe) "
                        "(default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic input height and "
                   "width; for resnet1d-N the signal length, e.g. 40 as in mnist1d (default: "
                   "%(default)s)")
    p.add_argument("--in-channels", type=int, default=3, metavar="C",
                   help="channels of the synthetic input: 3 as in CIFAR, 1 as in the digits "
                        "and mnist1d (default: %(default)s)")
    p.add_argument("--context", type=int, default=128, metavar="T",
                   help="gpt-L: tokens per sample; its rows report tokens/s (default: "
                        "%(default)s)")
    p.add_argument("--width", type=int, help="gpt-L: the width (default: 256)")
    p.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="with R >= 2, also run DDG with K stages x R replicas on the process "
                        "runtime: ddg-graph-kKr1, ddg-graph-k1rR (one stage, R replicas: "
                        "data parallelism through DDG's code) and ddg-graph-kKrR; rows with "
                        "more processes than cores are reported as oversubscribed "
                        "(default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="also run -compile twins of bp-1t, bp-Kt, ddg-graph-threads, "
                        "ddg-recompute-threads and ddg-graph-processes (torch.compile; the "
                        "compiling happens in the warm-up steps, so give --warmup 5 or more)")
    p.add_argument("--link-gbps", type=float, default=None, metavar="GBIT_S",
                   help="link bandwidth for the cost model's predictions (default: "
                        "communication is free and overlapped; the K x R predictions, which "
                        "a free link would make perfect, assume 10)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu, or cuda: every configuration on GPUs (stage or rank k on cuda:k "
                        "mod count; DDP and torch's pipelines only with K GPUs), timed with "
                        "CUDA events, with each GPU's peak memory (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="where bench.json and bench.png go; a folder "
                   "that is not empty is refused (default: runs/bench, with -2, -3, ... when "
                   "taken)")
    p.add_argument("--overwrite", action="store_true", help="replace bench.json and bench.png "
                   "in a non-empty --out (nothing else is removed)")
    p.add_argument("--no-progress", action="store_true", help="hide the per-run progress lines")


def add_paper_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small smoke version (ResNet-20, "
                   "2 epochs, one seed, K = 2 and 4, constant step size)")
    p.add_argument("--model", help="override the network (default: resnet56; quick: resnet20)")
    p.add_argument("--epochs", type=int, help="override the epochs per run (default: 15)")
    p.add_argument("--seeds", type=int_list, metavar="S1,S2", help="override the seeds "
                   "(default: 0,1,2)")
    p.add_argument("--stages", type=int_list, metavar="K1,K2", help="override the K values "
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
    p.add_argument("--seeds", type=int_list, metavar="S1,S2",
                   help="seeds of every run (default: 0,1,2; quick: 0)")
    p.add_argument("--stages", type=int_list, metavar="K1,K2",
                   help="the K values, each >= 2 and at most the model's block count; "
                        "backprop is always run (default: 2,3,4,8; quick: 2,4)")
    p.add_argument("--benchmarks", type=str_list, metavar="B1,B2",
                   help="digits (ResNet-56, 15 epochs) and/or mnist1d (ResNet-20-1D, 30 "
                        "epochs) (default: digits,mnist1d)")
    p.add_argument("--parts", type=str_list, metavar="P1,P2",
                   help="main: every method at backprop's hyperparameters; sweep: plain DDG at "
                        "lr 0.05, 0.025, 0.0125; budget: backprop and plain DDG with 3x the "
                        "epochs (at --budget-stages, on --budget-seeds seeds). Each part also "
                        "trains the backprop runs its gaps need; runs shared by parts are "
                        "trained once (default: main,sweep,budget)")
    p.add_argument("--budget-stages", type=int_list, metavar="K1,K2",
                   help="the K values of the budget part; a long run costs as much as 3 short "
                        "ones (default: 4; quick: 2,4)")
    p.add_argument("--budget-seeds", type=int, metavar="N",
                   help="the budget part trains the first N of --seeds; its table compares "
                        "every method on those seeds only (default: 1)")
    _grid_arguments(p, "runs/staleness", "DIR/BENCHMARK/METHOD/kK-sSEED")


def add_lm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke version: a tiny GPT, one seed, K = 2, horizons of 12 and 24 "
                        "steps, two backprop rates, DDG and Muon")
    p.add_argument("--horizons", type=int_list, metavar="H1,H2",
                   help="training lengths in iterations, each with a warm-up of a tenth and "
                        "its own cosine; 800 goes to DIR, others to DIR/hH (default: "
                        "800,3200,12800)")
    p.add_argument("--seeds", type=int_list, metavar="S1,S2",
                   help="seeds; by default 3200 trains the first one and 12800 the first "
                        "two (see --seed-counts) (default: 0,1,2; quick: 0)")
    p.add_argument("--seed-counts", type=str_list, metavar="H:N,H:N",
                   help="how many of --seeds (the first ones) each named horizon trains; "
                        "others train all (default: 3200:1,12800:2)")
    p.add_argument("--stages", type=int_list, metavar="K1,K2",
                   help="the K values, each between 2 and the model's blocks; backprop is "
                        "always run (default: 2,4,8; quick: 2)")
    p.add_argument("--variants", type=str_list, metavar="V1,V2",
                   help="the ways of training below --long-from, e.g. bp,bp-lr2,ddg,ddg-m4 "
                        "(default: every backprop rate and method; results.md lists them)")
    p.add_argument("--long-variants", type=str_list, metavar="V1,V2",
                   help="the ways of training at horizons from --long-from on: the methods "
                        "that lead at the shorter ones, with backprop rates (default: "
                        "bp-lr4,bp-lr8,bp-lr16,ddg-m4-lr4+wp,ddg-m8-lr2+wp)")
    p.add_argument("--long-from", type=int, metavar="H",
                   help="the first horizon that trains --long-variants only (default: 12800)")
    p.add_argument("--wallclock", action="store_true",
                   help="also time bench rows of the model at K = 2 (two-thread backprop, "
                        "DDP, GPipe, 1F1B, the recommended DDG) on this machine and combine "
                        "them with the study's iso-loss steps: DIR/wallclock.md")
    p.add_argument("--plan-only", action="store_true",
                   help="train nothing: print per horizon the runs planned, finished and left "
                        "in --out, and the core-minutes left (about 7 per 800 iterations)")
    p.add_argument("--recommended", metavar="VARIANT",
                   help="--wallclock: the DDG variant to time (default: the report's "
                        "recommendation)")
    _grid_arguments(p, "runs/lm", "DIR/[hH/]VARIANT/kK-sSEED")


def _grid_arguments(p: argparse.ArgumentParser, out: str, layout: str) -> None:
    """The flags every resumable grid shares."""
    p.add_argument("--workers", type=int, default=2,
                   help="runs trained at once, each a process with one torch thread on the "
                        "reference executor (default: %(default)s)")
    p.add_argument("--out", default=out, metavar="DIR",
                   help=f"where the runs ({layout}), results.md, summary.json and figures go; "
                        "runs already finished there with the same settings are skipped "
                        "(default: %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write results.md, summary.json and the figures from "
                        "the runs finished so far in --out, naming the missing ones")
    p.add_argument("--no-progress", action="store_true", help="hide the per-run lines")

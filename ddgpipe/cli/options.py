"""The flags of ``train`` and ``demo``, one function per group; the bench's and the
experiments' are in :mod:`ddgpipe.cli.study_options`."""

from __future__ import annotations

import argparse
import textwrap

from ddgpipe.training.recipes import ASYNCPP

__all__ = ["PRESETS", "LineHelpFormatter", "add_train_arguments", "model_defaults",
           "int_list", "str_list"]


PRESETS = {
    "paper-cifar": dict(data="cifar10", batch_size=128, optimizer="sgd", momentum=0.9,
                        weight_decay=5e-4, lr=0.1, lr_schedule="multistep",
                        milestones=[150, 225], lr_gamma=0.1, epochs=300),
    "asyncpp": ASYNCPP,
}


class LineHelpFormatter(argparse.HelpFormatter):
    """Keeps the line breaks of a help text that has them (one line per compensation)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        if "\n" not in text:
            return super()._split_lines(text, width)
        return [part for line in text.splitlines()
                for part in (textwrap.wrap(line, width, subsequent_indent="    ") or [""])]


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_train_arguments(p: argparse.ArgumentParser, defaults_for_demo: bool = False) -> None:
    """Every flag of ``train`` (the demo takes only the model and data ones)."""
    _model_and_data(p)
    if defaults_for_demo:
        return
    for group in (_method, _optimisation, _language_model, _run, _checkpoints, _executors):
        group(p)


def _model_and_data(p: argparse.ArgumentParser) -> None:
    from ddgpipe.data import DATASET_NAMES
    from ddgpipe.models import MODEL_NAMES

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet20", metavar="NAME",
                   help=f"network: {', '.join(MODEL_NAMES)} (CIFAR ResNets of He et al. 2016 "
                        "with option-A shortcuts; resnet1d-N: the same with 1-D convolutions, "
                        "for mnist1d; an MLP; gpt-L: a decoder-only transformer of L blocks, "
                        "e.g. gpt-8); or your own: FILE.py:FACTORY or package.module:FACTORY, "
                        "a callable returning an nn.Module, called under the run's seed with "
                        "no arguments or the keywords num_classes (classes; for text, the "
                        "vocabulary) and input_shape (one sample's shape) it names; hf:DIR, a "
                        "local HuggingFace causal LM folder (config.json, with weights if "
                        "saved, else freshly initialised; needs `pip install 'ddgpipe[hf]'`). "
                        "With --stages > 1 DDG cuts an nn.Sequential (default: %(default)s)")
    g.add_argument("--data", metavar="NAME",
                   help=f"data set: {', '.join(DATASET_NAMES)}; digits is scikit-learn's 1797 "
                        "handwritten 8x8 digits, embedded; mnist1d is MNIST-1D (Greydanus "
                        "2020), 1 x 40 signals generated offline on first use and cached in "
                        "$DDGPIPE_CACHE (default ~/.cache/ddgpipe); cifar10/cifar100 need "
                        "--data-dir; shakespeare is 5.3 MB of Shakespeare's plays as byte "
                        "tokens, for language models (shipped in a pinned package); synthetic "
                        "is random data for throughput only; or your own: text:PATH, any file "
                        "as byte tokens (or --tokenizer's) in windows of --context, 5%% of its "
                        "blocks held out; tensors:PATH, a .pt dict or .npz with train_x, "
                        "train_y, test_x, test_y (integer labels; optional num_classes, else "
                        f"the largest label + 1) {_both('data')}")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="--data text:PATH: tokenize with the HuggingFace tokenizer saved in "
                        "DIR (its vocabulary replaces the 256 bytes)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the "
                        "extracted official python archives)")


def _method(p: argparse.ArgumentParser) -> None:
    from ddgpipe.core.stash import STASH_MODES

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
    g.add_argument("--split", type=int_list, metavar="I,J",
                   help="cut points by block index, e.g. 4,8 makes blocks [0,4) [4,8) [8,end); "
                        "default: balance by --balance")
    g.add_argument("--balance", default=None, choices=("params", "flops", "time", "pipeline"),
                   help=BALANCE_HELP)
    g.add_argument("--grad-shrink", type=float, default=1.0, metavar="BETA",
                   help="scale stage k's delayed gradient by BETA**delay (gradient shrinking, "
                        "from the authors' follow-up, Fully Decoupled Neural Network Learning "
                        "Using Delayed Gradients, Zhuang et al. 2019); 1 is DDG "
                        "(default: %(default)s)")
    g.add_argument("--microbatches", type=int, default=1, metavar="M",
                   help="ddg/fr: feed each minibatch as M microbatches of batch-size / M, one "
                        "per clock; every stage steps once per M clocks with the mean of the "
                        "gradients it summed meanwhile, so a gradient is at most "
                        "ceil(delay / M) steps stale (microbatched DDG, as pipelines are run); "
                        "1 is the paper's DDG (default: %(default)s)")
    _compensation(g)


BALANCE_HELP = (
    "how to cut the network when --split is not given: params (parameter count), flops "
    "(counted floating-point operations of each block's forward+backward), time (each block "
    "profiled), or pipeline: the profiled cut and each cut one block away run for a few clocks "
    "on copies of the model, and the fastest is kept (seconds to a minute at start-up). "
    "Default: the cut this machine timed before for the same model, batch shape, schedule, "
    "executor and devices (kept in the cache folder, $DDGPIPE_CACHE), timed once when there is "
    "none, so the same command and seed give the same numbers; --balance pipeline times it "
    "again. The reference executor uses the threaded executor's cut. The cut used is saved as "
    "split in RUN_DIR/config.json; pass it back with --split to repeat a run on another machine")


def _compensation(g: argparse._ArgumentGroup) -> None:
    """``--compensation`` and one flag per option of :mod:`ddgpipe.core.compensation`'s table."""
    from ddgpipe.core.compensation import COMPENSATIONS, OPTION_TABLE

    g.add_argument("--compensation", metavar="NAME[,NAME]",
                   help="for --method ddg/fr, comma-separated; default none:\n" + "\n".join(
                            f"  {name}: {line}" for name, line in COMPENSATIONS.items()))
    for option in OPTION_TABLE:
        g.add_argument(option.flag, type=option.kind, metavar=option.metavar, help=option.help)


def compensation_options(args: argparse.Namespace) -> dict | None:
    """The compensation options given as flags, by option name; None when none was."""
    from ddgpipe.core.compensation import OPTION_TABLE

    given = {o.name: getattr(args, o.name) for o in OPTION_TABLE}
    return {k: v for k, v in given.items() if v is not None} or None


# Flags whose default depends on the model: a language model (gpt-L) trains on the text
# corpus with AdamW for a number of iterations; the image and signal networks with SGD for
# epochs. An explicit flag (or a preset) always wins.
NETWORK_DEFAULTS = {"data": "digits", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
                    "batch_size": 64, "epochs": 15, "iterations": None, "beta2": None,
                    "clip_grad": None, "warmup_iters": 0, "eval_every": 0}
LANGUAGE_MODEL_DEFAULTS = {"data": "shakespeare", "optimizer": "adamw", "lr": 1e-3,
                           "weight_decay": 0.1, "batch_size": 16, "epochs": 1,
                           "iterations": 1000, "beta2": 0.95, "clip_grad": 1.0,
                           "warmup_iters": 100, "eval_every": 100}


def model_defaults(model: str, data: str | None = None) -> dict:
    """A language model's defaults for gpt-L, hf:DIR, or any model on text; else a
    network's."""
    from ddgpipe.data.user import is_text_data
    from ddgpipe.models import is_language_model

    text = data == "shakespeare" or is_text_data(data)
    language = is_language_model(model) or model.startswith("hf:") or text
    return LANGUAGE_MODEL_DEFAULTS if language else NETWORK_DEFAULTS


def _both(flag: str) -> str:
    """The two defaults of ``flag``, for its help line."""
    a, b = NETWORK_DEFAULTS[flag], LANGUAGE_MODEL_DEFAULTS[flag]
    return (f"(default: {'none' if a is None else a}; for gpt-L, hf:DIR or text "
            f"{'none' if b is None else b})")


def _optimisation(p: argparse.ArgumentParser) -> None:
    from ddgpipe.training.optim import LR_SCHEDULES, OPTIMIZERS

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"passes over the training set {_both('epochs')}")
    g.add_argument("--iterations", type=int, metavar="N",
                   help="the run's length in minibatches instead of epochs (the LR schedule "
                        f"spans them) {_both('iterations')}")
    g.add_argument("--batch-size", type=int, help="minibatch size; with --replicas R the "
                   f"global one, split into R equal shards {_both('batch_size')}")
    g.add_argument("--eval-batch-size", type=int, default=512, metavar="N",
                   help="minibatch size when scoring the held-out set; the scores do not "
                        "depend on it beyond rounding (default: %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="sgd (with --momentum, --nesterov; L2 weight decay); adam (L2 weight "
                        "decay on every parameter); adamw and nadam (decoupled weight decay on "
                        "matrices only, none on biases and norms, as nanoGPT; nadam is "
                        "torch's NAdam, Nesterov momentum with its momentum schedule); muon "
                        "(torch.optim.Muon for the matrices inside the network, AdamW for "
                        f"embeddings, the output layer, biases and norms) {_both('optimizer')}")
    g.add_argument("--lr", type=float, help=f"base learning rate {_both('lr')}")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; 0 is plain SGD "
                   "as in the paper's analysis (default: %(default)s)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    g.add_argument("--beta1", type=float, help="adamw, nadam, muon: the first moment's decay "
                   "(default: 0.9)")
    g.add_argument("--beta2", type=float, help="adamw, nadam, muon: the second moment's decay "
                   f"{_both('beta2').replace('none', 'torch: 0.999')}")
    g.add_argument("--weight-decay", type=float, help=f"weight decay {_both('weight_decay')}")
    g.add_argument("--clip-grad", type=float, metavar="NORM",
                   help="clip the gradient norm before every step. DDG's stages learn from "
                        "different minibatches, so each stage clips its own gradient (a norm "
                        "across stages would mix minibatches); with one stage it is backprop's "
                        f"global clip {_both('clip_grad')}")
    g.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="constant; multistep (x --lr-gamma at --milestones epochs); sqrt: "
                        "lr/sqrt(1+t) and inverse: lr/(1+t), the diminishing step sizes, t in "
                        "epochs; cosine, to 0 at the end of the run (default: %(default)s)")
    g.add_argument("--milestones", type=int_list, default=[], metavar="E1,E2",
                   help="epochs at which multistep multiplies the lr by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="multistep factor (default: "
                   "%(default)s)")
    g.add_argument("--warmup-iters", type=int, metavar="N",
                   help="raise the lr linearly over the first N iterations, then run the "
                        f"schedule over the rest (nanoGPT's warm-up) {_both('warmup_iters')}")
    _scaled_to_the_run(g)
    g.add_argument("--warmup-epochs", type=int, default=0, metavar="N",
                   help="multiply the lr by --warmup-factor for the first N epochs (He et al.'s "
                        "ResNet-110 recipe) (default: %(default)s)")
    g.add_argument("--warmup-factor", type=float, default=0.1, help="lr multiplier during the "
                   "warm-up epochs (default: %(default)s)")
    g.add_argument("--preset", choices=tuple(PRESETS), help="a documented recipe; flags given "
                   "explicitly override it. paper-cifar: the DDG paper's CIFAR schedule (data "
                   "cifar10, batch 128, SGD momentum 0.9, weight decay 5e-4, lr 0.1 x0.1 at "
                   "epochs 150 and 225, 300 epochs, crop+flip; lr 0.01 for the first epoch of "
                   "resnet110). asyncpp: Ajanthan et al.'s recipe for a run of any length "
                   "(NAdam, betas 0.99/0.999, lr 3e-4, weight decay 0.01 decoupled, clip 10, "
                   "warm-up 6%% of the run, cosine to 0.1x, --nadam-horizon 50000)")


def _scaled_to_the_run(g: argparse._ArgumentGroup) -> None:
    """The settings a recipe scales with the run's length (``ddgpipe.training.recipes``)."""
    g.add_argument("--warmup-share", type=float, default=0.0, metavar="F",
                   help="warm up linearly over this fraction of the run's iterations instead "
                        "of --warmup-iters (AsyncPP: 0.06, 3000 of 50 000)")
    g.add_argument("--lr-floor", type=float, default=0.0, metavar="F",
                   help="cosine ends at this fraction of the lr instead of 0 (AsyncPP: 0.1) "
                        "(default: %(default)s)")
    g.add_argument("--nadam-horizon", type=int, metavar="N",
                   help="nadam: pace its momentum schedule, mu_t = beta1 (1 - 0.5 * 0.96^(t "
                        "psi)), with psi = 0.004 N / (the run's iterations), so mu over this "
                        "run follows torch's default over N steps (AsyncPP: 50000); default: "
                        "torch's psi 0.004")


def _language_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("language models (--model gpt-L)")
    g.add_argument("--context", type=int, default=128, metavar="T",
                   help="tokens per window, and the model's positions (default: %(default)s)")
    g.add_argument("--width", type=int, help="the residual stream's width (default: 256)")
    g.add_argument("--heads", type=int, help="attention heads (default: 4)")
    g.add_argument("--dropout", type=float, help="dropout on embeddings, attention and "
                   "residuals (default: 0.1)")
    g.add_argument("--tie-embeddings", action="store_true",
                   help="share the token embedding with the output projection (GPT-2's "
                        "tying). Under DDG the first and the last stage each hold a copy, "
                        "both stepping every clock with the sum of the two uses' gradients "
                        "(DNI refuses it); untied is the default")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="score the held-out set every N iterations (an eval record in "
                        f"metrics.jsonl) {_both('eval_every')}")


def _run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and "
                   "augmentation; same seed, same numbers (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch intra-op threads per stage (default: "
                   "this machine's cores divided by the number of stages)")
    g.add_argument("--out", metavar="RUN_DIR", help="write config.json, metrics.jsonl and the "
                   "model here; a folder that is not empty is refused (default: "
                   "runs/<model>-<method>-k<K>-s<seed>, with -2, -3, ... when taken)")
    g.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty "
                   "--out (its config, metrics, model and checkpoints; nothing else is removed)")
    g.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="also log the training loss every N iterations (default: epochs only)")
    g.add_argument("--timeline", action="store_true",
                   help="record every op's start/end to RUN_DIR/timeline.jsonl for "
                        "`ddgpipe plot --timeline`")
    g.add_argument("--config", metavar="FILE", dest="config_file",
                   help="read settings from a TOML or JSON file (keys: the flags' names with "
                        "_ for -, e.g. batch_size = 64, or a run's own config.json); flags "
                        "given as well override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the effective settings as TOML (a valid --config file) and "
                        "exit")
    g.add_argument("--label", help="name shown in tables and plots (default: e.g. 'DDG K=4')")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar")
    g.add_argument("--log", type=str_list, default=[], metavar="SINK[,SINK]",
                   help="also write every metrics record to: tensorboard (RUN_DIR/tensorboard, "
                        "needs pip install ddgpipe[tensorboard]), csv (RUN_DIR/metrics-KIND.csv, "
                        "one file per record kind); metrics.jsonl is always written")


def _checkpoints(p: argparse.ArgumentParser) -> None:
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
                   help="continue the run in RUN_DIR from its newest complete checkpoint with "
                        "the settings saved in RUN_DIR/config.json. Flags beside it may change "
                        "only what keeps the numbers: more --iterations or --epochs, "
                        "--eval-every, --checkpoint-every(-epochs), --stop-after, progress, "
                        "--log-every, --log, --timeline, --label, --timeout and --executor "
                        "(the executors agree bitwise); any other that differs is refused. The "
                        "resumed run ends with bitwise the weights of an uninterrupted one")


def _executors(p: argparse.ArgumentParser) -> None:
    from ddgpipe.core.precision import PRECISIONS
    from ddgpipe.runtime.devices import DEVICE_CHOICES
    from ddgpipe.runtime.placement import COMMS, EXECUTORS

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
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where to compute: {DEVICE_CHOICES}; auto is CUDA when available, "
                        "cuda spreads the stages over the GPUs (stage k on cuda:k mod count). "
                        "Under torchrun each rank uses cuda:LOCAL_RANK (default: %(default)s)")
    g.add_argument("--devices", type=str_list, metavar="D0,D1",
                   help="one device per stage, e.g. cuda:0,cuda:1 (overrides --device)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; bf16: autocast to bfloat16 in every stage; fp16: autocast to "
                        "float16 with dynamic loss scaling, the scale travelling with each "
                        "minibatch's delayed gradient (default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="run every stage's forward and backward through torch.compile "
                        "(backprop: the whole model). The first steps compile (tens of seconds "
                        "on a CPU); numbers differ from eager ones by rounding, and dropout "
                        "draws differ (the compiled kernels draw their own masks)")
    g.add_argument("--comm", default="auto", choices=COMMS,
                   help="--executor processes/torchrun on GPUs: auto sends GPU tensors with "
                        "nccl; host stages them through host memory over gloo (needed when "
                        "several ranks share one GPU, which nccl refuses) (default: "
                        "%(default)s)")
    g.add_argument("--timeout", dest="timeout_s", type=float, default=300.0, metavar="SECONDS",
                   help="how long a stage waits for a peer before the run stops with an "
                        "error (default: %(default)s)")

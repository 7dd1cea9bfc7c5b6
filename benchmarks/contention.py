"""How much do two stages slow each other down when they compute at once on two cores?

The smallest experiment behind the throughput section of the README: no pipeline, no
queues, no delays. Each piece of work (a DDG stage's forward+backward on the full batch, or
DDP's whole-model forward+backward on half the batch) runs in a loop on one Python thread
with one intra-op thread, first alone, then beside its partner on the other core. If the
pieces slow down when they share the machine, no executor can recover that time: it is the
machine's, and it is what separates DDG's ~1.85x from the ideal 2x.

    python benchmarks/contention.py --model resnet56 --batch-size 128 --split 11
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from ddgpipe import tune_allocator
from ddgpipe.models import build_model


def loop(module, x, seconds: float, out: list, barrier: threading.Barrier | None) -> None:
    """forward+backward of ``module`` on ``x`` for ``seconds``; per-iteration seconds to out."""
    torch.set_num_threads(1)
    for _ in range(2):  # warm-up
        module(x.detach().requires_grad_(True)).sum().backward()
    if barrier is not None:
        barrier.wait()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        module(x.detach().requires_grad_(True)).sum().backward()
        out.append(time.perf_counter() - start)


def run(pieces: list[tuple], seconds: float) -> list[float]:
    """Median iteration ms of each piece, all running at once (one thread each)."""
    results = [[] for _ in pieces]
    barrier = threading.Barrier(len(pieces)) if len(pieces) > 1 else None
    threads = [threading.Thread(target=loop, args=(m, x, seconds, r, barrier))
               for (m, x), r in zip(pieces, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [1000 * statistics.median(r) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--split", type=int, default=11, help="DDG's cut (block index)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    model = build_model(args.model)
    x = torch.randn(args.batch_size, 3, 32, 32)
    first, second = model[: args.split], model[args.split:]
    with torch.no_grad():
        middle = first(x)
    half = x[: args.batch_size // 2].clone()
    ddg = [(first, x), (second, middle)]
    ddp = [(model, half), (build_model(args.model), half.clone())]
    rows = {"bp one thread, full batch": [], "ddg stage 0 alone": [], "ddg stage 1 alone": [],
            "ddg stage 0 beside stage 1": [], "ddg stage 1 beside stage 0": [],
            "ddp half batch alone": [], "ddp half batch beside the other": []}
    for _ in range(args.rounds):  # interleaved, so drift hits every row alike
        rows["bp one thread, full batch"] += run([(model, x)], args.seconds)
        a, = run([ddg[0]], args.seconds)
        b, = run([ddg[1]], args.seconds)
        rows["ddg stage 0 alone"].append(a)
        rows["ddg stage 1 alone"].append(b)
        a, b = run(ddg, args.seconds)
        rows["ddg stage 0 beside stage 1"].append(a)
        rows["ddg stage 1 beside stage 0"].append(b)
        rows["ddp half batch alone"] += run([ddp[0]], args.seconds)
        a, b = run(ddp, args.seconds)
        rows["ddp half batch beside the other"].append(max(a, b))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.model}, batch {args.batch_size}, cut at block {args.split}; median ms per "
          f"iteration over {args.rounds} rounds of {args.seconds:.0f} s")
    for name, ms in med.items():
        print(f"  {name:<34} {ms:8.1f}")
    bp = med["bp one thread, full batch"]
    ddg_clock = max(med["ddg stage 0 beside stage 1"], med["ddg stage 1 beside stage 0"])
    ddp_step = med["ddp half batch beside the other"]
    print(f"  slowdown from sharing: ddg stage 0 x"
          f"{med['ddg stage 0 beside stage 1'] / med['ddg stage 0 alone']:.3f}, stage 1 x"
          f"{med['ddg stage 1 beside stage 0'] / med['ddg stage 1 alone']:.3f}; ddp x"
          f"{ddp_step / med['ddp half batch alone']:.3f}")
    print(f"  bound on speed-up over one-thread bp (no waits, no optimizer): ddg "
          f"{bp / ddg_clock:.2f}x, ddp {bp / ddp_step:.2f}x")


if __name__ == "__main__":
    main()

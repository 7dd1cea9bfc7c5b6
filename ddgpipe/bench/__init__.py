"""Throughput bench: DDG against backprop, DDP and torch's synchronous pipelines on CPU.

Every configuration trains the same model on the same synthetic batch in fresh spawned
processes; see :mod:`ddgpipe.bench.config` for the list and :func:`run_bench` for the result.

Example (minutes on a laptop)::

    from ddgpipe.bench import BenchConfig, format_bench_table, run_bench
    result = run_bench(BenchConfig(model="resnet20", steps=10, rounds=1), out_dir="bench")
    print(format_bench_table(result))
"""

from ddgpipe.bench.config import CONFIG_NAMES, BenchConfig, config_names
from ddgpipe.bench.report import format_bench_table
from ddgpipe.bench.runner import run_bench, summarise

__all__ = ["BenchConfig", "CONFIG_NAMES", "config_names", "format_bench_table", "run_bench",
           "summarise"]

"""Run every configuration for several interleaved rounds and summarise the throughputs.

Each round runs every configuration once, in the same order, and divides each one's
images/s by the baseline's (``bp-1t``) *of the same round*; a noisy machine then shifts the
numbers of a whole round together and the ratios stay comparable. The summary keeps the
median, min and max of those per-round ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ddgpipe.bench.config import OPTIMIZERS, BenchConfig, ConfigSpec, baseline, resolve
from ddgpipe.bench.workers import profile_split_worker, run_config_worker, threaded_split_worker
from ddgpipe.bench.workload import bench_model, tokens_per_sample
from ddgpipe.errors import UsageError, WorkerError
from ddgpipe.machine import machine_info
from ddgpipe.runtime.allocator import allocator_setting
from ddgpipe.runtime.devices import cores_per_stage
from ddgpipe.runtime.launch import run_workers

__all__ = ["run_bench", "summarise"]

_PROFILE_KEYS = ("f_ms", "b_ms", "s_ms", "wait_ms", "busy_s", "wall_s", "utilisation")


def summarise(rounds: list[dict[str, float | None]], baseline: str = "bp-1t",
              reference: str | None = None) -> dict[str, dict]:
    """Per configuration: median images/s and the per-round ratios' median, min and max.

    ``rounds[r][name]`` is the images/s of configuration ``name`` in round r (None or absent:
    it failed). Ratios divide by ``baseline`` of the same round; ``ratio_vs_bp_Kt_median`` is
    the median per-round ratio to ``reference`` (None without one). Rounds where either side
    is missing do not count.
    """
    names = list(dict.fromkeys(n for r in rounds for n in r))
    out: dict[str, dict] = {}
    for name in names:
        values = [v for r in rounds if (v := r.get(name))]
        ratios = [v / b for r in rounds if (v := r.get(name)) and (b := r.get(baseline))]
        vs_ref = [v / b for r in rounds
                  if reference and (v := r.get(name)) and (b := r.get(reference))]
        out[name] = {
            "images_per_s": statistics.median(values) if values else None,
            "images_per_s_rounds": [r.get(name) for r in rounds],
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "ratio_vs_bp_Kt_median": statistics.median(vs_ref) if vs_ref else None,
        }
    return out


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _median_profile(per_round: list[list[dict]]) -> list[dict]:
    """Stage by stage (process by process under replicas), the median of each profile number
    over the rounds."""
    stages = []
    for k in range(len(per_round[0])):
        entries = [r[k] for r in per_round]
        merged = {"stage": entries[0].get("stage", k),
                  "waits_logged": all(e.get("waits_logged") for e in entries)}
        if "replica" in entries[0]:
            merged["replica"] = entries[0]["replica"]
        for key in _PROFILE_KEYS:
            merged[key] = statistics.median(e[key] for e in entries)
        stages.append(merged)
    return stages


def _backend(config: BenchConfig, processes: int) -> str:

    if config.device == "cpu" or torch.cuda.device_count() < processes:
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def _run_one(config: BenchConfig, spec: ConfigSpec, split: list[int]) -> list[dict]:
    return run_workers(run_config_worker, spec.processes, (config, spec, split),
                       threads=spec.threads, timeout_s=config.timeout_s,
                       peer_timeout_s=min(300.0, config.timeout_s),
                       backend=_backend(config, spec.processes))


def cut_key(spec: ConfigSpec) -> str | None:
    """Which timed cut a configuration runs: its executor's and its stash mode's (a replay
    costs the first stages a second forward, so they take fewer blocks); GPipe and 1F1B run
    DDG graph's process cut, so they compare on one cut. None: no cut (backprop, DDP)."""
    if spec.kind == "ddg-threads":
        return f"threads/{spec.stash}"
    if not spec.uses_runtime_cut:
        return None
    return f"processes/{spec.stash or 'graph'}"


def _choose_cuts(config: BenchConfig, specs: list[ConfigSpec]) -> dict[str, dict]:
    """The cut of each (executor, stash mode) in use, timed as pipelines of that kind."""
    cuts = {}
    share = cores_per_stage(config.stages)
    for key in dict.fromkeys(k for k in map(cut_key, specs) if k is not None):
        executor, stash = key.split("/")
        if executor == "processes":
            cuts[key] = run_workers(profile_split_worker, config.stages, (config, stash),
                                    threads=share, timeout_s=config.timeout_s,
                                    backend=_backend(config, config.stages))[0]
        else:
            cuts[key] = run_workers(threaded_split_worker, 1, (config, share, stash),
                                    threads=share, timeout_s=config.timeout_s)[0]
    return cuts


def run_bench(config: BenchConfig, out_dir: str | Path | None = None,
              progress: bool = True) -> dict:
    """Run the bench (minutes for the defaults) and return the result dict.

    With ``out_dir``, also writes ``bench.json`` and ``bench.png`` there. Progress goes to
    stderr, one line per finished configuration run. Raises :class:`UsageError` for bad
    settings; a configuration whose workers fail is reported with an ``error`` field.
    """
    specs = resolve(config)
    blocks = len(bench_model(config))
    if config.stages > blocks:
        raise UsageError(f"{config.model} has {blocks} blocks, too few for {config.stages} "
                         f"stages; pass stages={blocks} or fewer")
    cuts = _choose_cuts(config, specs)
    for kind, cut in cuts.items():
        timed = ", ".join(f"[{k}] {v:.0f}" for k, v in cut["clock_ms"].items())
        _log(progress, f"bench: {config.model}, batch {config.batch_size}, {config.stages} "
                       f"stages; {kind} cut at blocks {cut['split']} of {blocks} (profiling "
                       f"proposed {cut['profiled_split']}; timed ms per clock: {timed})")
    _log(progress, f"bench: {len(specs)} configs x {config.rounds} rounds")
    measured = Measurements()
    for r in range(config.rounds):
        measured.run_round(config, specs, cuts, f"{r + 1}/{config.rounds}", progress)
    summary = summarise(measured.rounds, baseline(config), f"bp-{config.stages}t")
    rows = [measured.row(spec, cuts, summary[spec.name]) for spec in specs]
    result = _result(config, blocks, cuts, rows, measured.rounds)
    if out_dir is not None:
        _write(result, Path(out_dir), progress)
    return result


class Measurements:
    """What the rounds measured, per configuration: images/s by round, peak memory, stage
    profiles and the first error."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float | None]] = []
        self.peak: dict[str, list[float]] = {}
        self.peak_gpu: dict[str, list[float]] = {}
        self.profiles: dict[str, list[list[dict]]] = {}
        self.errors: dict[str, str] = {}

    def run_round(self, config: BenchConfig, specs: list[ConfigSpec], cuts: dict[str, dict],
                  which: str, progress: bool) -> None:
        """Every configuration once, in order; a failed one counts as missing this round."""
        this_round: dict[str, float | None] = {}
        width = max(len(s.name) for s in specs)
        for spec in specs:
            key = cut_key(spec)
            try:
                results = _run_one(config, spec, cuts[key]["split"] if key else [])
            except WorkerError as e:
                self.errors.setdefault(spec.name, str(e).splitlines()[0])
                this_round[spec.name] = None
                _log(progress, f"round {which}  {spec.name:<{width}}  "
                               f"failed: {str(e).splitlines()[0]}")
                continue
            elapsed = max(res["elapsed_s"] for res in results)
            this_round[spec.name] = ips = config.steps * config.batch_size / elapsed
            self.add(spec, results)
            _log(progress, f"round {which}  {spec.name:<{width}}  {ips:8.1f} img/s")
        self.rounds.append(this_round)

    def add(self, spec: ConfigSpec, results: list[dict]) -> None:
        """One run's peak memory (the maximum over rounds) and stage profiles."""
        mem = [res["peak_mem_mb"] for res in results]
        old = self.peak.get(spec.name)
        self.peak[spec.name] = mem if old is None else [max(a, b) for a, b in zip(old, mem)]
        gpu = results[0]["peak_gpu_mb"] if spec.processes == 1 else \
            [max(res["peak_gpu_mb"]) for res in results if res["peak_gpu_mb"]]
        if gpu:
            old = self.peak_gpu.get(spec.name)
            self.peak_gpu[spec.name] = gpu if old is None else [max(a, b) for a, b in
                                                                zip(old, gpu)]
        if spec.kind in ("ddg", "ddg-replicas"):
            self.profiles.setdefault(spec.name, []).append([res["stage_profile"]
                                                            for res in results])
        elif spec.kind == "ddg-threads":
            self.profiles.setdefault(spec.name, []).append(results[0]["stage_profiles"])

    def row(self, spec: ConfigSpec, cuts: dict[str, dict], summary: dict) -> dict:
        """The configuration's row of ``bench.json``."""
        row = {"name": spec.name, "kind": spec.kind, "processes": spec.processes,
               "threads": spec.threads, "microbatches": spec.microbatches,
               "stash": spec.stash, "compile": spec.compile,
               "compensation": spec.compensation,
               "split": cuts[key]["split"] if (key := cut_key(spec)) else None,
               **summary,
               "peak_mem_mb": self.peak.get(spec.name, [])}
        if spec.kind == "ddg-replicas":
            row.update(stages=spec.stages, replicas=spec.replicas,
                       oversubscribed=spec.oversubscribed)
        if spec.name in self.peak_gpu:
            row["peak_gpu_mb"] = self.peak_gpu[spec.name]
        if spec.name in self.profiles:
            row["stage_profile"] = _median_profile(self.profiles[spec.name])
        if spec.name in self.errors:
            row["error"] = self.errors[spec.name]
        return row


def _result(config: BenchConfig, blocks: int, cuts: dict[str, dict], rows: list[dict],
            rounds: list[dict[str, float | None]]) -> dict:
    """``bench.json``: the settings, the machine, the cuts, the rows and the raw rounds."""
    sync = [row for row in rows if row["kind"] in ("gpipe", "1f1b")
            and row["ratio_median"] is not None]
    best = max(sync, key=lambda row: row["ratio_median"], default=None)
    return {
        "config": asdict(config),
        "machine": machine_info(),
        "optimizer": dict(OPTIMIZERS[config.optimizer]),  # every row steps with it
        "blocks": blocks,
        "tokens_per_sample": tokens_per_sample(config),  # samples/s times this: tokens/s
        "split": cuts.get("processes/graph", {}).get("split"),
        "split_threads": cuts.get("threads/graph", {}).get("split"),
        "split_choice": {kind: {k: v for k, v in cut.items() if k != "allocator"}
                         for kind, cut in cuts.items()},
        "allocator": allocator_setting(),  # as the workers ran (the launcher tunes every one)
        "rows": rows,
        "best_sync_pipeline": ({"name": best["name"], "ratio_median": best["ratio_median"]}
                               if best else None),
        "rounds": rounds,
    }


def _write(result: dict, out_dir: Path, progress: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plotted = [row for row in result["rows"] if row["ratio_median"] is not None]
    cfg = result["config"]
    title = (f"{cfg['model']}, batch {cfg['batch_size']}, {cfg['stages']} workers: "
             f"images/s relative to 1-thread backprop")
    try:
        from ddgpipe.training.plots import plot_bench

        plot_bench(plotted, str(out_dir / "bench.png"), title=title)
    except Exception as e:  # the measurements are saved already; do not lose them to a plot
        result["plot_error"] = f"{type(e).__name__}: {e}"
        (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        _log(True, f"bench: could not draw bench.png ({result['plot_error']}); "
                   f"the numbers are in {out_dir / 'bench.json'}")

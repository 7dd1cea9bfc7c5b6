"""What each command does with its parsed flags, built on the Python API."""

from __future__ import annotations

import argparse
from pathlib import Path

from ddgpipe.errors import UsageError
from ddgpipe.training.validation import check_config

__all__ = ["cmd_train", "cmd_bench", "cmd_experiment", "cmd_plot",
           "config_from_args", "format_results"]

BENCH_FILES = ("bench.json", "bench.png")  # what `ddgpipe bench --overwrite` replaces


def config_from_args(args: argparse.Namespace):
    """The run's config from the parsed flags: every destination that is a config key is
    taken as it is (a new flag is a new setting, nothing to add here); the settings whose
    default depends on others (the model's defaults, K, the length, the folder) are derived."""
    from ddgpipe.cli.options import compensation_options
    from ddgpipe.training import TrainConfig
    from ddgpipe.training.config import flat_keys

    keys = set(flat_keys())
    flat = {k: v for k, v in vars(args).items() if k in keys}
    flat |= derived_settings(args)
    return TrainConfig.from_flat(**flat | {"compensation_options": compensation_options(args)})


def derived_settings(args: argparse.Namespace) -> dict:
    """The settings whose default is not a constant: K by method, the model's defaults
    (a language model trains for iterations with AdamW), the length, warm-up and folder."""
    from ddgpipe.cli.options import model_defaults
    from ddgpipe.models import model_label
    from ddgpipe.training.run_dir import default_run_dir

    stages = args.stages if args.stages is not None else (1 if args.method == "bp" else 2)
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UsageError(f"--resume {args.resume} continues in that directory; drop --out or "
                         "make it the same")
    out = args.resume or args.out or str(default_run_dir(model_label(args.model), args.method,
                                                         stages, args.seed))
    executor = args.executor
    if args.replicas > 1 and executor is None:  # replicas live in processes of their own
        executor = "processes"
    defaults = model_defaults(args.model, args.data)
    given = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, default in defaults.items()}  # the flag, else this model's default
    # an explicit --epochs sets the length, unless --iterations is given too
    iterations = args.iterations if args.iterations is not None or args.epochs is not None \
        else defaults["iterations"]
    warmup = given["warmup_iters"] if args.warmup_iters is not None or not args.warmup_share \
        else 0  # a --warmup-share replaces the default warm-up
    if args.warmup_iters is None and iterations:  # the default warm-up: at most a tenth
        warmup = min(warmup, iterations // 10)
    return given | dict(stages=stages, out=out, executor=executor, iterations=iterations,
                        warmup_iters=warmup)


def format_results(results) -> str:
    """A small table a person can read: method, test accuracy (or a language model's held-out
    loss in bits per byte), loss, time, throughput."""
    if all(r.val_bits_per_byte is not None for r in results):
        rows = [("method", "val loss", "bits/byte", "train loss", "train time", "tokens/s")]
        for r in results:
            rows.append((r.label, f"{r.test_loss:.4f}", f"{r.val_bits_per_byte:.4f}",
                         f"{r.train_loss:.4f}", f"{r.train_time_s:.1f}s",
                         f"{r.tokens_per_s:.0f}"))
    else:
        rows = [("method", "test acc", "test loss", "train loss", "train time", "images/s")]
    for r in results if rows[0][1] == "test acc" else []:
        rows.append((r.label, f"{100 * r.test_acc:.2f}%", f"{r.test_loss:.4f}",
                     f"{r.train_loss:.4f}", f"{r.train_time_s:.1f}s", f"{r.images_per_s:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from ddgpipe.cli.config_files import check_resume_changes, toml_text
    from ddgpipe.runtime.launch import init_from_env, process_backend, run_workers, under_torchrun
    from ddgpipe.training import train, train_worker
    from ddgpipe.training.lm_plots import plot_runs
    from ddgpipe.training.run_dir import check_out_dir, prepare_out_dir

    config = config_from_args(args)
    check_config(config)
    check_resume_changes(config, args, args.train_parser)
    if args.print_config:
        print(toml_text(config.to_dict()), end="")
        return 0
    where = config.placement
    # every rank refuses another run's folder here, before any rendezvous
    check_out_dir(str(config.out), resuming=config.resume is not None,
                  overwrite=config.overwrite)
    if where.executor == "processes" and not under_torchrun():
        # Fail here, before spawning, if it is not writable.
        prepare_out_dir(config.out, keep=config.resume is not None, overwrite=config.overwrite)
        result = run_workers(train_worker, config.stages * where.replicas, (config,),
                             peer_timeout_s=where.peer_timeout_s, threads=where.threads,
                             backend=process_backend(where.device, where.devices,
                                                     where.comm))[-1]
    elif init_from_env(where.peer_timeout_s, backend=process_backend(where.device, None,
                                                                      where.comm)):
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
    png = plot_runs([result.run_dir], Path(result.run_dir) / "curves.png")
    print(f"metrics: {Path(result.run_dir) / 'metrics.jsonl'}\nplot:    {png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import math

    from ddgpipe.bench import BenchConfig, format_bench_table, run_bench
    from ddgpipe.bench.predict import predict_measured, predict_scaling, predicted_stage_ms
    out = _bench_out_dir(args)
    config = BenchConfig(model=args.model, batch_size=args.batch_size, stages=args.stages,
                         steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                         microbatches=tuple(args.microbatches),
                         configs=tuple(args.configs) if args.configs else None,
                         image_size=args.image_size, in_channels=args.in_channels,
                         device=args.device,
                         replicas=args.replicas, context=args.context, width=args.width,
                         compile=args.compile, optimizer=args.optimizer)
    if args.link_gbps is not None and not args.link_gbps > 0:
        raise UsageError(f"--link-gbps must be > 0 (got {args.link_gbps})")
    bandwidth = math.inf if args.link_gbps is None else args.link_gbps * 1e9 / 8
    result = run_bench(config, out_dir=out, progress=not args.no_progress)
    scaling = predict_scaling(config, bandwidth_bytes_per_s=bandwidth)
    measured, per_stage = [], {}
    for row in result["rows"]:
        split = row.get("split")
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
    per = result["tokens_per_sample"]
    unit = "tok/s" if per > 1 else "img/s"
    print("\ncost model (schedule simulation):")
    for cut, stage_ms in per_stage.items():
        for k, (f, b) in enumerate(stage_ms):
            print(f"  cut [{cut}] stage {k}: predicted F {f:.1f} ms  B {b:.1f} ms per clock "
                  "(one-thread block profile; measured above)")
    for m in measured:
        print(f"  {m['name']:<22} predicted {per * m['predicted_images_per_s']:7.0f} {unit} "
              f"from its stage times, measured {per * m['measured_images_per_s']:7.0f} "
              f"({100 * m['measured_over_predicted']:.0f}%)")
    for row in scaling["rows"]:
        print(f"  K={row['stages']:<3} predicted {row['speedup_vs_bp_1t']:.2f}x bp-1t "
              f"({per * row['images_per_s']:.0f} {unit}, cut {row['split']}) with K free cores")
    link_gbps = scaling["replica_link_bytes_per_s"] * 8 / 1e9
    print(f"  K x R with K x R free devices, each replica on 1/R of batch {config.batch_size} "
          f"(compute assumed linear in the batch), activations and gradient averages (ring "
          f"all-reduce, overlapped with the backward) over {link_gbps:g} Gbit/s links:")
    for row in scaling["replica_rows"]:
        print(f"  K={row['stages']:<2} x R={row['replicas']:<3} ({row['devices']:>3} devices) "
              f"predicted {row['speedup_vs_bp_1t']:6.2f}x bp-1t "
              f"({per * row['images_per_s']:.0f} {unit}, clock {row['clock_ms']:.2f} ms)")
    print(f"\nresults: {out / 'bench.json'}\nplot:    {out / 'bench.png'}")
    return 0


def _bench_out_dir(args: argparse.Namespace) -> Path:
    """``--out`` (refused when not empty, unless ``--overwrite``), else a free runs/bench."""
    from ddgpipe.training.run_dir import free_out_dir, prepare_out_dir

    return prepare_out_dir(args.out or free_out_dir("runs/bench"), overwrite=args.overwrite,
                           owned=BENCH_FILES, resumable=False)


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.experiment == "staleness":
        return cmd_staleness(args)
    if args.experiment == "lm":
        return cmd_lm(args)
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


def cmd_lm(args: argparse.Namespace) -> int:
    from ddgpipe.experiments.lm import lm_plan, run_lm

    plan = lm_plan(quick=args.quick)
    for field, value in (("horizons", args.horizons), ("seeds", args.seeds),
                         ("stage_counts", args.stages), ("variants", args.variants),
                         ("long_variants", args.long_variants)):
        if value is not None:
            setattr(plan, field, tuple(value))
    if args.long_from is not None:
        plan.long_from = args.long_from
    if args.seed_counts is not None:
        plan.seed_counts = _seed_counts(args.seed_counts)
    plan.workers = args.workers
    if args.plan_only:
        from ddgpipe.experiments.lm.run import format_plan_cost, plan_cost

        print(format_plan_cost(plan_cost(plan, args.out), plan.workers))
        return 0
    if args.recommended and not args.wallclock:
        raise UsageError("--recommended names the DDG variant --wallclock times: add "
                         "--wallclock")
    summary = run_lm(plan, args.out, progress=not args.no_progress,
                     report_only=args.report_only)
    if args.wallclock:
        _lm_wallclock(plan, summary, Path(args.out), args.recommended, not args.no_progress)
        run_lm(plan, args.out, progress=False, report_only=True)  # the report shows it
    return _print_report(Path(args.out))


def _seed_counts(pairs: list[str]) -> dict[int, int]:
    """``--seed-counts 3200:1,12800:2`` as {3200: 1, 12800: 2}."""
    counts = {}
    for pair in pairs:
        horizon, _, count = pair.partition(":")
        if not (horizon.isdigit() and count.isdigit()):
            raise UsageError(f"--seed-counts takes HORIZON:SEEDS pairs, e.g. 3200:1,12800:2 "
                             f"(got {pair!r})")
        counts[int(horizon)] = int(count)
    return counts


def _lm_wallclock(plan, summary: dict, out: Path, recommended: str | None,
                  progress: bool) -> None:
    """Time the bench rows of the study's model at K = 2 (unless timed already with the same
    settings) and combine them with the study's steps to backprop's loss."""
    from ddgpipe.bench import BenchConfig, run_bench
    from ddgpipe.experiments.lm.wallclock import (
        bench_settings,
        choose_variant,
        ddg_bench_row,
        saved_bench,
        write_wallclock,
    )

    name, row = choose_variant(summary, recommended)
    settings = bench_settings(plan, ddg_bench_row(name))
    bench = saved_bench(out / "wallclock", settings)
    if bench is None:
        config = BenchConfig(**(settings | {"microbatches": tuple(settings["microbatches"]),
                                            "configs": tuple(settings["configs"])}))
        bench = run_bench(config, out / "wallclock", progress=progress)
    write_wallclock(name, row, settings, bench, out)


def _print_report(out: Path) -> int:
    print((out / "results.md").read_text())
    print(f"report:  {out / 'results.md'}\nsummary: {out / 'summary.json'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ddgpipe.training.lm_plots import plot_runs
    from ddgpipe.training.plots import plot_timeline

    if args.timeline:
        for run in args.run_dirs:
            print(plot_timeline(run, args.out if len(args.run_dirs) == 1 else None))
        return 0
    out = args.out or Path(args.run_dirs[0]) / "curves.png"
    print(plot_runs(args.run_dirs, out))
    return 0



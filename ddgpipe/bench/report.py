"""The bench result as a fixed-width text table, with DDG's per-stage profile under it."""

from __future__ import annotations

__all__ = ["format_bench_table"]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_bench_table(result: dict) -> str:
    """One line per configuration: img/s (tok/s for a language model), x bp-1t median
    [min-max], x bp-Kt, peak MB."""
    cfg = result["config"]
    k = cfg["stages"]
    per = result.get("tokens_per_sample", 1)
    header = ["config", "tok/s" if per > 1 else "img/s", "x bp-1t median [min-max]",
              f"x bp-{k}t", "peak MB/process"]
    lines = []
    for row in result["rows"]:
        ips = "-" if row["images_per_s"] is None else f"{row['images_per_s'] * per:.1f}"
        if row["ratio_median"] is None:
            ratio = "-"
        else:
            ratio = (f"{row['ratio_median']:.2f} [{row['ratio_min']:.2f}-"
                     f"{row['ratio_max']:.2f}]")
        mem = " ".join(f"{m:.0f}" for m in row["peak_mem_mb"]) or "-"
        if row.get("peak_gpu_mb"):
            mem += " (GPU " + " ".join(f"{m:.0f}" for m in row["peak_gpu_mb"]) + ")"
        if row.get("error"):
            mem += f"  error: {row['error']}"
        lines.append([row["name"], ips, ratio, _ratio(row["ratio_vs_bp_Kt_median"]), mem])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    widths[-1] = 0  # the last column is left ragged

    def fmt(cells: list[str]) -> str:
        parts = [f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in
                 enumerate(zip(cells[:-1], widths[:-1]))]
        return "  ".join([*parts, cells[-1]]).rstrip()

    cuts = [f"{key} cut at blocks {cut['split']}" for key, cut in
            result.get("split_choice", {}).items()]
    out = [f"{cfg['model']}, batch {cfg['batch_size']}, {k} workers, {cfg['steps']} timed "
           f"steps x {cfg['rounds']} rounds; {'; '.join(cuts) or 'no cut'}",
           fmt(header), fmt(["-" * w for w in widths[:-1]] + ["-" * len(header[-1])])]
    out += [fmt(cells) for cells in lines]
    best = result.get("best_sync_pipeline")
    if best:
        out.append(f"best synchronous pipeline: {best['name']} "
                   f"(x{best['ratio_median']:.2f} bp-1t)")
    cores = result.get("machine", {}).get("cpu_count")
    for row in result["rows"]:
        if row.get("oversubscribed"):
            out.append(f"{row['name']}: {row['processes']} processes ({row['stages']} stages x "
                       f"{row['replicas']} replicas) on {cores} cores: oversubscribed, the "
                       "processes share cores, so this row measures the code path, not the "
                       "scaling (see the cost model's prediction)")
    for row in result["rows"]:
        for st in row.get("stage_profile", []):
            where = f" replica {st['replica']}" if "replica" in st else ""
            cut = f" (cut {row['split']})" if row.get("split") else ""
            out.append(f"{row['name']}{cut} stage {st['stage']}{where}: F {st['f_ms']:.1f} ms  "
                       f"B {st['b_ms']:.1f} ms  S {st['s_ms']:.1f} ms  "
                       f"wait {st['wait_ms']:.1f} ms per clock; "
                       f"busy {st['utilisation']:.0%} of {st['wall_s']:.2f} s")
    return "\n".join(out)

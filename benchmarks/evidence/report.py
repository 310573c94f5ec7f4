"""The benchmark's output: a markdown table with verdicts, and two plots (quality vs training FLOPs, vs sampling time)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diffusers_stages.cli import write_atomically

from ..measure import write_text

TITLES = {
    "1": "Comparison 1: UNet2DModel vs multi-stage multi-decoder U-Net (Zhang et al., CVPR 2024)",
    "2": "Comparison 2: one large model vs 4 experts of different architectures (MEME, AAAI 2024)",
    "3": "Comparison 3: deep only vs dual backbone at several switch points (DuoDiff)",
}
CLAIMS = {
    "1": "the baseline's quality in 35-75% of the training compute",
    "2": "faster sampling at equal or better quality",
    "3": "faster sampling at equal quality",
}


def _final(rows, method):
    candidates = [r for r in rows if r["method"] == method]
    return max(candidates, key=lambda r: r["budget_fraction"]) if candidates else None


def verdicts(results: list[dict], spread: float) -> dict[str, list[str]]:
    """Plain-language readings of the measured rows, one list per comparison; ``spread`` is the FD-classifier
    difference caused by the sampling seed alone (differences below it are not called wins or losses)."""
    out = {}
    rows = [r for r in results if r["comparison"] == "1"]
    base, staged = _final(rows, "UNet2DModel"), _final(rows, "MultiStageUNet2DModel")
    if base and staged:
        lines = [
            f"Equal training compute (B): FD-classifier {base['fd']:.2f} (baseline) vs {staged['fd']:.2f} "
            f"(multi-stage), seed spread {spread:.2f}."
        ]
        reached = sorted(
            (r for r in rows if r["method"] == staged["method"] and r["fd"] <= base["fd"]),
            key=lambda r: r["budget_fraction"],
        )
        if reached:
            first = reached[0]
            lines.append(
                f"Equal quality: the multi-stage model reaches the baseline's final FD-classifier at "
                f"{first['budget_fraction']:.0%} of B (first snapshot that does; snapshots every "
                f"{min(r['budget_fraction'] for r in rows):.0%}). Claim ({CLAIMS['1']}): "
                f"{'holds' if first['budget_fraction'] <= 0.75 else 'does not hold'} at this scale."
            )
        else:
            lines.append(
                f"Equal quality: the multi-stage model does not reach the baseline's final FD-classifier "
                f"within B. Claim ({CLAIMS['1']}): does not hold at this scale."
            )
        out["1"] = lines
    for comparison in ("2", "3"):
        rows = [r for r in results if r["comparison"] == comparison]
        base = _final(rows, "UNet2DModel")
        if base and base.get("seconds_per_image"):
            methods = [r for r in rows if r["method"].startswith(("MEME", "DuoDiff"))]
            out[comparison] = [_speed_line(r, base, spread, CLAIMS[comparison]) for r in methods]
        full = _final(rows, "early exit, full depth")
        if full and full.get("seconds_per_image"):
            exits = [r for r in rows if r["method"].startswith("early exit, threshold")]
            out[comparison] += [_speed_line(r, full, spread, None) for r in exits]
            duo = [r for r in rows if r["method"].startswith("DuoDiff") and r.get("seconds_per_image")]
            if duo and exits:
                best_duo, best_exit = min(duo, key=lambda r: r["fd"]), min(exits, key=lambda r: r["fd"])
                better = best_duo["fd"] < best_exit["fd"] - spread
                faster = best_duo["seconds_per_image"] <= best_exit["seconds_per_image"]
                verdict = (
                    "holds" if better and faster else "mixed: better quality, slower" if better else "does not hold"
                )
                out[comparison].append(
                    f"DuoDiff vs early exit: best DuoDiff ({best_duo['method']}) FD-classifier {best_duo['fd']:.2f} at "
                    f"{best_duo['seconds_per_image'] * 1e3:.2f} ms/image; best early exit ({best_exit['method']}) "
                    f"{best_exit['fd']:.2f} at {best_exit['seconds_per_image'] * 1e3:.2f} ms/image. Claim (ahead of "
                    f"early exit: better quality at no more time): {verdict} at this scale."
                )
    return out


def _speed_line(row: dict, base: dict, spread: float, claim: str | None) -> str:
    speed = base["seconds_per_image"] / row["seconds_per_image"]
    delta = row["fd"] - base["fd"]
    quality = "equal or better, within" if delta <= spread else "worse by more than"
    line = (
        f"{row['method']}: {speed:.2f}x the sampling speed of {base['method']} (wall time), "
        f"{base['sampling_gflops_per_image'] / row['sampling_gflops_per_image']:.2f}x fewer sampling FLOPs, "
        f"FD-classifier {row['fd']:.2f} vs {base['fd']:.2f} ({quality} the seed spread {spread:.2f}) at "
        f"{row['budget_fraction']:.0%} of B."
    )
    if claim:
        line += f" Claim ({claim}): {'holds' if speed > 1.0 and delta <= spread else 'does not hold'}."
    return line


# a method's timing repeats (max / min) spread by more than this: a load that hit some of them, not the method
UNRELIABLE_SPREAD = 1.25


def _repeat_ranges(results: list[dict]) -> dict[tuple[str, str], tuple[float, float, float]]:
    """``{(comparison, method): (fastest, median, slowest repeat)}`` in ms per image, for the rows whose timing
    repeats were recorded (results saved before they were have none); one entry per timing group and method."""
    return {
        (r["comparison"], r["method"]): (
            min(r["seconds_per_image_repeats"]) * 1e3,
            r["seconds_per_image"] * 1e3,
            max(r["seconds_per_image_repeats"]) * 1e3,
        )
        for r in results
        if r.get("seconds_per_image_repeats")
    }


def unreliable_timings(results: list[dict]) -> str:
    """A sentence naming every method whose timing repeats spread by more than `UNRELIABLE_SPREAD` (slowest / fastest)
    with their range, and the comparisons to rerun; ``""`` when none did (or none were recorded)."""
    spread = {key: r for key, r in _repeat_ranges(results).items() if r[2] > UNRELIABLE_SPREAD * r[0]}
    if not spread:
        return ""
    named = "; ".join(
        f"{method} (comparison {comparison}): {low:.2f}-{high:.2f} ms/image (median {median:.2f})"
        for (comparison, method), (low, median, high) in spread.items()
    )
    again = sorted({comparison for comparison, _ in spread})
    which = "that comparison" if len(again) == 1 else "those comparisons"
    return (
        f"Unreliable timings, repeats spread by more than {UNRELIABLE_SPREAD}x: {named}. A job that ran during some "
        f"of a method's repeats inflates its median: rerun {which} (`--comparisons {','.join(again)}`) "
        "on an idle machine before reading these times."
    )


def _timing_stability(results: list[dict]) -> str:
    """How much the baseline's own wall time moved between the timing groups of one run (machine load), and which
    methods' repeats within a group spread (a load that hit some of them)."""
    parts = []
    times = [r["seconds_per_image"] for r in results if r["method"] == "UNet2DModel" and r.get("seconds_per_image")]
    if len(times) >= 2:
        low, high = min(times) * 1e3, max(times) * 1e3
        parts.append(f"The baseline's own time per image ranged {low:.2f}-{high:.2f} ms across the timing groups.")
        if high > 1.5 * low:
            parts.append(
                "The machine's load changed during the run (it was shared): wall-time ratios are only as good as "
                "the interleaving within a group; the FLOP ratios are exact."
            )
    if _repeat_ranges(results):
        parts.append(
            unreliable_timings(results)
            or f"Every method's timing repeats were within {UNRELIABLE_SPREAD}x of each other in each group."
        )
    return "**Timing stability.** " + " ".join(parts) if parts else ""


def _fmt(value, pattern):
    return "" if value is None else pattern.format(value)


def _floor_images(reference: dict) -> str:
    """Which held-out images give the floor (results saved before `real_image_floor` name only a count)."""
    if reference.get("extrapolated"):
        return (
            f"The {reference['held_out']} held-out real images (test split), extrapolated in 1 / count to "
            f"{reference['count']} images,"
        )
    if "extrapolated" in reference:  # scored by `real_image_floor`
        return f"{reference['count']} held-out real images (test split, classes in turn)"
    return f"{reference.get('count', 'The')} held-out real images (test split)"


def write_markdown(path: str, header: dict, results: list[dict], spread: float) -> None:
    """The results table, one section per comparison, with the command, machine and metric floor on top."""
    read = verdicts(results, spread)
    lines = [
        f"# Evidence benchmark: preset `{header['preset']['name']}` ({header['preset']['dataset']})",
        "",
        f"Produced by `{header['command']}` on {header['date']} ({header['machine']}); total "
        f"{header['wall_minutes']:.1f} min{'; ' + header['kept'] if header.get('kept') else ''}. Written by the "
        "benchmark: do not edit by hand.",
        "",
        "**Metric.** FD-classifier = Frechet distance between the features of a small CNN classifier trained "
        "(seeded, cached) on the training split, for generated images vs the training images "
        "(torchmetrics `FrechetInceptionDistance(feature=classifier)`). It is **not FID** and is not comparable with "
        "published numbers. Accuracy = the classifier's accuracy on the class-conditional samples (labels 0-9, "
        f"balanced). {header['preset']['num_eval_samples']} samples per score, DDIM "
        f"{header['preset']['num_inference_steps']} steps, no guidance.",
        "",
        f"**Floor and noise.** {_floor_images(header['reference'])} score FD-classifier "
        f"{header['reference']['fd']:.2f} "
        f"(accuracy {header['reference']['accuracy']:.3f}). Re-sampling the baseline with another seed moves its "
        f"score by {spread:.2f}: smaller differences are noise.",
        "",
        f"**Budget.** B = {header['budget_flops'] / 1e12:.3f} TFLOPs = {header['preset']['budget_steps']} training "
        f"steps of the baseline at batch {header['preset']['batch_size']} (forward + backward FLOPs counted with "
        "`FlopCounterMode` on the first and every 20th training step, the mean charged to the others). Sampling time = median over interleaved repeats of "
        f"{header['preset']['timing_batch']}-image batches, per image.",
        "",
        _timing_stability(results),
        "",
        "![quality vs training FLOPs](quality_vs_train_flops.png) ![quality vs sampling time](quality_vs_sampling_time.png)",
        "",
    ]
    for comparison, title in TITLES.items():
        rows = [r for r in results if r["comparison"] == comparison]
        if not rows:
            lines += [f"## {title}", "", "Not run.", ""]
            continue
        lines += [
            f"## {title}",
            "",
            "| method | train TFLOPs | % of B | FD-classifier (lower is better) | accuracy "
            "| params | ms / image | sampling GFLOPs / image | notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['train_flops'] / 1e12:.3f} | {r['budget_fraction']:.0%} | {r['fd']:.2f} | "
                f"{r['accuracy']:.3f} | {r['params'] / 1e6:.2f}M | {_fmt(r['seconds_per_image'] and r['seconds_per_image'] * 1e3, '{:.2f}')} | "
                f"{_fmt(r['sampling_gflops_per_image'], '{:.3f}')} | {r['notes']} |"
            )
        lines += [""] + [f"- {line}" for line in read.get(comparison, [])] + [""]
    lines += ["## Settings", "", "```json", _json(header["preset"]), "```", ""]
    write_text(path, "\n".join(lines))


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True)


# one marker per series, in the order of first appearance (then line styles, past 12 series)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")


def _finish_axes(ax, reference_fd: float, xlabel: str, title: str, legend_size: int) -> None:
    ax.axhline(reference_fd, color="grey", linestyle=":", label="held-out real images")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FD-classifier (lower is better)")
    # linear axes from 0: the gaps between methods are what the plots are for, and a log axis shrinks them
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=legend_size)
    ax.set_title(title)


def quality_plots(results: list[dict], reference_fd: float, spread: float) -> dict[str, plt.Figure]:
    """The two figures, by file name: FD-classifier vs training TFLOPs (every snapshot) and vs sampling time (final
    models). One marker (and line style) per method; the seed-spread band, FD-classifier +- ``spread`` (what the
    sampling seed alone changes: the results header's ``fd_seed_spread``), shaded or as error bars."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    style = {m: (MARKERS[i % len(MARKERS)], LINESTYLES[i // len(MARKERS) % 4]) for i, m in enumerate(methods)}
    flops_fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in methods:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["train_flops"])
        rows = list({(r["train_flops"], r["fd"]): r for r in rows}.values())  # the baseline appears in 3 tables
        x, fd = [r["train_flops"] / 1e12 for r in rows], [r["fd"] for r in rows]
        marker, linestyle = style[method]
        if len(rows) > 1:
            (line,) = ax.plot(x, fd, marker=marker, linestyle=linestyle, label=method)
            ax.fill_between(x, [v - spread for v in fd], [v + spread for v in fd], color=line.get_color(), alpha=0.15)
        else:
            ax.errorbar(x, fd, yerr=spread, marker=marker, linestyle="none", capsize=3, label=method)
    _finish_axes(
        ax, reference_fd, "training TFLOPs", f"Quality vs training compute (band: seed spread {spread:.2f})", 7
    )

    time_fig, ax = plt.subplots(figsize=(6.5, 4.5))
    final = {}  # the last snapshot of each method in each comparison: earlier ones sample at the same speed
    for r in sorted(results, key=lambda r: r["train_flops"]):
        if r.get("seconds_per_image"):
            final[r["comparison"], r["method"]] = r
    for r in final.values():
        ax.errorbar(r["seconds_per_image"] * 1e3, r["fd"], yerr=spread, marker=style[r["method"]][0],
                    linestyle="none", capsize=3, label=f"[{r['comparison']}] {r['method']}")  # fmt: skip
    title = f"Quality vs sampling time, final models (bars: seed spread {spread:.2f})"
    _finish_axes(ax, reference_fd, "sampling wall time per image (ms)", title, 6)
    return {"quality_vs_train_flops.png": flops_fig, "quality_vs_sampling_time.png": time_fig}


def write_plots(directory: str, results: list[dict], reference_fd: float, spread: float = 0.0) -> list[str]:
    """``quality_vs_train_flops.png`` and ``quality_vs_sampling_time.png`` (`quality_plots`) in ``directory``."""
    paths = []
    for name, fig in quality_plots(results, reference_fd, spread).items():
        fig.tight_layout()
        paths.append(os.path.join(directory, name))
        write_atomically(paths[-1], lambda partial, fig=fig: fig.savefig(partial, dpi=120, format="png"))
        plt.close(fig)
    return paths

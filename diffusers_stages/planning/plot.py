"""A PNG of a stage plan: the curves it was derived from, with the chosen boundaries marked."""

from __future__ import annotations

import os

from .clustering import RUNNING_MEAN
from .stage_plan import StagePlan


def plot_plan(plan: StagePlan, path: str | os.PathLike, title: str | None = None) -> str:
    """Save ``plan``'s curves against the noise level, stages shaded and boundaries marked, as a PNG at ``path``.

    Example:

    ```py
    >>> import os, tempfile
    >>> from diffusers import DDPMScheduler
    >>> from diffusers_stages.planning import plan_stages, plot_plan
    >>> path = plot_plan(plan_stages(None, DDPMScheduler(), 3, "snr"), os.path.join(tempfile.mkdtemp(), "plan.png"))
    >>> open(path, "rb").read(4)
    b'\\x89PNG'

    ```

    A ``path`` whose extension names another image format (``plan.pdf``) is a `ValueError`.
    """
    from ..cli import check_png_path

    check_png_path(path, "path")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partition = plan.partition
    levels = plan.levels.numpy()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colour = -1
    for name, curve in plan.curves.items():
        dotted = name.startswith(RUNNING_MEAN)  # a running mean: dotted, in the colour of the curve it averages
        colour += not dotted
        ax.plot(levels, curve.numpy(), label=name, ls=":" if dotted else "-", color=f"C{colour % 10}")
    if plan.alpha is not None:  # where the running means cross it are the boundaries (Algorithm 1)
        ax.axhline(plan.alpha, color="0.3", ls="-.", lw=1, label=f"alpha = {plan.alpha:g} (mean-similarity threshold)")
    edges = [levels[0], *partition.boundaries, levels[-1]]
    for s, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        ax.axvspan(low, high, color=f"C{s % 10}", alpha=0.08, lw=0)
        centre = (low * high) ** 0.5 if partition.units == "sigma" else (low + high) / 2
        ax.text(
            centre,
            0.97 - 0.05 * (s % 2),
            f"stage {s}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
        )
    for i, (boundary, fraction) in enumerate(zip(partition.boundaries, plan.fractions)):
        ax.axvline(boundary, color="k", ls="--", lw=1)
        label = f" {boundary:.4g} ({fraction:.3f})"  # staggered, so that close boundaries stay readable
        ax.text(boundary, 0.02 + 0.07 * i, label, transform=ax.get_xaxis_transform(), fontsize=8)
    if partition.units == "sigma":
        ax.set_xscale("log")
    ax.set_xlabel("training timestep t" if partition.units == "timestep" else "noise level sigma")
    ax.set_title(title or f"{plan.method}: {partition.num_stages} stages")
    if plan.curves:
        ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return str(path)

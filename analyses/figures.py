"""Figures from tidy tables (never from models). Each returns a matplotlib Figure;
:func:`save` writes PNG + SVG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "spatialbias"  # SVG ids do not change between runs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from probes.format import atomic_write_bytes  # noqa: E402


def _grid_of(summary: dict, n: int) -> tuple[int, int]:
    g = summary.get("grid")
    if g:
        return int(g[0]), int(g[1])
    return (3, 3) if n == 9 else (1, n)


def _ticks(rows: int, cols: int) -> tuple[list[str], list[str]]:
    """Axis labels: the paper's L/C/R and T/M/B for 3×3, column/row indices otherwise."""
    if (rows, cols) == (3, 3):
        return ["L", "C", "R"], ["T", "M", "B"]
    return [f"c{c}" for c in range(cols)], [f"r{r}" for r in range(rows)]


def cell_heatmaps(summaries: dict[str, dict], key: str = "cell_accuracy", title: str = "accuracy per cell"):
    """One n×m heatmap per condition, side by side, on a shared colour scale (the grid from
    each summary's ``grid``; 3×3 when absent).

    ``summaries``: condition label → a :func:`analyses.metrics.cell_metrics` dict (or any dict
    with a per-cell list under ``key``, e.g. :func:`analyses.similarity.similarity_summary`).
    """
    n = len(summaries)
    grids = {k: np.asarray(v[key], float).reshape(_grid_of(v, len(v[key]))) for k, v in summaries.items()}
    lo = min(np.nanmin(g) for g in grids.values())
    hi = max(np.nanmax(g) for g in grids.values())
    rows, cols = next(iter(grids.values())).shape
    big = rows * cols > 16
    fig, axes = plt.subplots(1, n + 1, figsize=((2.6 + 0.25 * max(0, cols - 3)) * n + 0.8,
                                                 2.9 + 0.25 * max(0, rows - 3)),
                             gridspec_kw={"width_ratios": [1] * n + [0.06]})
    for ax, (label, g) in zip(axes[:n], grids.items()):
        s = summaries[label]
        xt, yt = _ticks(*g.shape)
        sns.heatmap(g, ax=ax, vmin=lo, vmax=hi, cmap="viridis", annot=not big, fmt=".2f", cbar=ax is axes[0],
                    cbar_ax=axes[n] if ax is axes[0] else None, square=True, xticklabels=xt,
                    yticklabels=yt, annot_kws={"fontsize": 8})
        if "mean_accuracy" in s:
            ax.set_title(f"{label}\nmean {s['mean_accuracy']:.3f} · range {s['range']:.3f}", fontsize=9)
        else:
            ax.set_title(f"{label}\nmean {np.nanmean(g):.3f} · range {np.nanmax(g) - np.nanmin(g):.3f}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def shift_curves(curves: dict[str, "object"], ylabel: str = "accuracy", cell_px: int | None = None,
                 title: str = "accuracy against the target's position"):
    """A metric against the target's offset along a continuous shift, one line per condition
    with its bootstrap band. ``curves``: label → :func:`analyses.metrics.shift_curve` table;
    ``cell_px`` draws the grid's cell boundaries."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, (label, c) in enumerate(curves.items()):
        ax.plot(c["offset"], c["mean"], "o-", ms=3, color=f"C{k}", label=label)
        ax.fill_between(c["offset"], c["ci_low"], c["ci_high"], color=f"C{k}", alpha=0.2, lw=0)
    if cell_px:
        hi = max(int(c["offset"].max()) for c in curves.values())
        for x in range(cell_px, hi + 1, cell_px):
            ax.axvline(x, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("target offset along the path (px)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def occlusion_maps(maps: dict[int, np.ndarray], grid: tuple[int, int] = (3, 3),
                   title: str = "occlusion: change of the answer logit difference, by target position"):
    """One panel per target position, laid out as the grid: ``maps`` is target cell →
    (steps, steps) map (:func:`analyses.occlusion.position_maps`); positions without a map are blank."""
    rows, cols = grid
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 1.9 * rows + 0.4), squeeze=False)
    vmax = max((float(np.nanmax(m)) for m in maps.values()), default=1.0) or 1.0
    for k in range(rows * cols):
        ax = axes[divmod(k, cols)]
        ax.set_xticks([])
        ax.set_yticks([])
        if k in maps:
            ax.imshow(maps[k], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"target in cell {k}", fontsize=7)
        else:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def lambda_curve(agci: list[dict], baseline: dict, bapa: dict | None = None):
    """Mean accuracy and range across cells against AGCI's λ (λ = 0 is the baseline);
    BaPA as dashed reference lines."""
    lams = [0.0] + [c["lambda"] for c in agci]
    rows = [baseline] + agci
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.1))
    for ax, key, name in ((axes[0], "mean_accuracy", "mean accuracy"), (axes[1], "range", "range (max − min)")):
        ax.plot(lams, [r[key] for r in rows], "o-", label="AGCI (λ = 0: baseline)")
        if bapa is not None:
            ax.axhline(bapa[key], ls="--", color="C1", label="BaPA")
        ax.set_xlabel("λ")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` atomically; returns both paths."""
    import io
    out_dir = Path(out_dir)
    paths = []
    for ext, kw in (("png", {"dpi": 130}), ("svg", {"metadata": {"Date": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
        p = out_dir / f"{stem}.{ext}"
        atomic_write_bytes(p, buf.getvalue())
        paths.append(p)
    plt.close(fig)
    return paths


def restoration_heatmaps(df, direction: str = "denoise", title: str | None = None, min_gap: float = 0.1):
    """Layer × site restoration: one panel per condition; rows are sites in forward order,
    columns token groups. ``df``: :func:`interp.patching.restoration` rows with ``condition``.
    A condition whose clean − corrupt gap is below ``min_gap`` (logit units) has no gap to
    restore: its panel is left blank and says so."""
    d = df[df.direction == direction]
    conds = list(dict.fromkeys(d.condition))
    sites = list(dict.fromkeys(d.site))
    groups = [g for g in ("all", "target", "image", "text", "last") if g in set(d.group)]
    fig, axes = plt.subplots(1, len(conds) + 1, figsize=(3.0 * len(conds) + 0.8, 0.32 * len(sites) + 1.6),
                             gridspec_kw={"width_ratios": [1] * len(conds) + [0.06]})
    for k, (ax, cond) in enumerate(zip(axes[:-1], conds)):
        piv = d[d.condition == cond].pivot_table(index="site", columns="group", values="restoration")
        piv = piv.reindex(index=sites, columns=groups)
        gap = d[d.condition == cond][["clean", "corrupt"]].mean()
        small = abs(gap["clean"] - gap["corrupt"]) < min_gap
        if small:
            piv = piv * float("nan")
        sns.heatmap(piv, ax=ax, vmin=-0.2, vmax=1.2, cmap="RdBu_r", center=0.5, annot=True, fmt=".2f",
                    annot_kws={"fontsize": 7}, cbar=k == 0, cbar_ax=axes[-1] if k == 0 else None,
                    yticklabels=k == 0)
        note = " (no gap to restore)" if small else ""
        ax.set_title(f"{cond}\nclean {gap['clean']:.2f} · corrupt {gap['corrupt']:.2f}{note}", fontsize=9)
        ax.set_xlabel("token group")
        ax.set_ylabel("site" if k == 0 else "")
    fig.suptitle(title or f"activation patching ({direction}): normalised restoration", fontsize=10)
    fig.tight_layout()
    return fig


def flow_target_by_placement(fl, grid: tuple[int, int] = (3, 3)):
    """Attention mass from the last token to the target's own cell, as an n×m map (``grid``) over
    where the target is; one row of panels per condition, one column per layer."""
    own = fl[fl.cell == fl.target_cell]
    conds = list(dict.fromkeys(own.condition))
    layers = sorted(own.layer.unique())
    vmax = own.mass.max()
    fig, axes = plt.subplots(len(conds), len(layers), figsize=(2.5 * len(layers) + 0.5, 2.4 * len(conds)),
                             squeeze=False)
    for i, cond in enumerate(conds):
        for j, layer in enumerate(layers):
            v = own[(own.condition == cond) & (own.layer == layer)].sort_values("target_cell").mass.to_numpy()
            sns.heatmap(v.reshape(*grid), ax=axes[i][j], vmin=0, vmax=vmax, cmap="magma", annot=True, fmt=".3f",
                        annot_kws={"fontsize": 7}, cbar=False, square=True, xticklabels=False, yticklabels=False)
            axes[i][j].set_title(f"{cond} · layer {layer}", fontsize=8)
    fig.suptitle("attention from the last token to the target's cell, by target placement", fontsize=10)
    fig.tight_layout()
    return fig


def flow_layer_cell(fl):
    """Layer × cell attention mass from the last token (mean over the placements), per condition."""
    conds = list(dict.fromkeys(fl.condition))
    fig, axes = plt.subplots(1, len(conds), figsize=(3.6 * len(conds), 2.6), squeeze=False)
    for ax, cond in zip(axes[0], conds):
        piv = fl[fl.condition == cond].pivot_table(index="layer", columns="cell", values="mass")
        sns.heatmap(piv, ax=ax, cmap="magma", annot=True, fmt=".2f", annot_kws={"fontsize": 6}, cbar=False)
        ax.set_title(cond, fontsize=9)
    fig.suptitle("attention mass per layer and cell (mean over placements)", fontsize=10)
    fig.tight_layout()
    return fig


def knockout_plot(ko):
    """Drop of the answer logit difference when question tokens cannot attend to a cell, per layer."""
    g = sns.catplot(data=ko, x="layers", y="drop", hue="blocked", col="condition", kind="point", height=2.8,
                    aspect=1.0, dodge=0.2)
    g.set_axis_labels("knocked-out layer(s)", "drop in logit diff")
    g.figure.suptitle("attention knockout from the question tokens", fontsize=10, y=1.03)
    return g.figure


def position_patching_plot(pp):
    """Restoration of the clean−corrupt gap by swapping position ids, all layers and per layer."""
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    sns.barplot(data=pp, x="layers", y="restoration", hue="condition", ax=ax)
    ax.axhline(1.0, ls="--", color="grey", lw=0.8)
    ax.set_ylabel("restoration")
    ax.set_xlabel("layers with swapped ids")
    ax.set_title("position-id patching: corrupt run with the clean target's ids", fontsize=10)
    fig.tight_layout()
    return fig

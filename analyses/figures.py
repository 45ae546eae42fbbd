"""Figures from tidy tables (never from models). Each returns a matplotlib Figure;
:func:`save` writes PNG + SVG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from probes.format import atomic_write_bytes  # noqa: E402


def cell_heatmaps(summaries: dict[str, dict], key: str = "cell_accuracy", title: str = "accuracy per cell"):
    """One 3×3 heatmap per condition, side by side, on a shared colour scale.

    ``summaries``: condition label → a :func:`analyses.metrics.cell_metrics` dict.
    """
    n = len(summaries)
    grids = {k: np.asarray(v[key], float).reshape(3, 3) for k, v in summaries.items()}
    lo = min(np.nanmin(g) for g in grids.values())
    hi = max(np.nanmax(g) for g in grids.values())
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * n + 0.8, 2.9),
                             gridspec_kw={"width_ratios": [1] * n + [0.06]})
    for ax, (label, g) in zip(axes[:n], grids.items()):
        s = summaries[label]
        sns.heatmap(g, ax=ax, vmin=lo, vmax=hi, cmap="viridis", annot=True, fmt=".2f", cbar=ax is axes[0],
                    cbar_ax=axes[n] if ax is axes[0] else None, square=True, xticklabels=["L", "C", "R"],
                    yticklabels=["T", "M", "B"], annot_kws={"fontsize": 8})
        ax.set_title(f"{label}\nmean {s['mean_accuracy']:.3f} · range {s['range']:.3f}", fontsize=9)
    fig.suptitle(title, fontsize=10)
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
    for ext, kw in (("png", {"dpi": 130}), ("svg", {})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
        p = out_dir / f"{stem}.{ext}"
        atomic_write_bytes(p, buf.getvalue())
        paths.append(p)
    plt.close(fig)
    return paths

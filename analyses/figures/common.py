"""What every figure shares: selection of a results table, seed means, display order and colours
of the conditions, the annotated heatmap, the page-size rules, and PNG + SVG saving.

Readability rules (tested in ``tests/test_figures.py``):

* **Size.** The report shows a figure's PNG (saved at :data:`DPI` = 130, where one PNG pixel is one
  CSS px) in a page at most :data:`PAGE_WIDTH_PX` = 1150 CSS px wide; a wider PNG is shrunk by the
  browser. Every text must read at ≥ :data:`MIN_DISPLAY_PT` = 9 pt there (:func:`displayed_pt`), so
  figures are at most :data:`MAX_WIDTH_IN` wide (panels wrap into rows, :func:`_panels`) and no text
  is under :data:`ANNOT_PT` = 7 pt. The font sizes come from :data:`STYLE`, applied by
  :func:`styled` around each figure function (global rcParams are never changed).
* **Colour scales.** Panels that are compared share one colour scale, with a colour bar.
* **Anchored scales.** Accuracy and probability (p(correct)) scales — colours and axes — span
  0–1 (:data:`UNIT`), never the data's range, so a colour or a height means the same in every
  panel and every run and noise cannot look like contrast. Other quantities (attention mass,
  restoration, cosine) use the scale their figure documents.

Role: helpers of :mod:`analyses.figures`. May import: ``spatialbias``, ``analyses.vocabulary``,
matplotlib, pandas. Nothing here touches a model; the backend is never forced here (notebooks
show figures inline); :func:`save` renders files through an off-screen canvas.
"""
from __future__ import annotations

import functools
import io
import math
import textwrap
from pathlib import Path
from typing import Iterable, Optional, Union

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.vocabulary import FAMILIES
from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_bytes

Labels = Optional[Union[str, Iterable[str]]]

FAMILY_ORDER = FAMILIES
FAMILY_COLOURS = {"baseline": "#4d4d4d", "bapa": "#1f77b4", "agci": "#d62728", "agci-adaptive": "#ff7f0e",
                  "positions": "#2ca02c"}
_EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
GROUP_ORDER = ("all", "target", "image", "text", "last")
CONDITION_KEYS = ["model", "probe", "intervention", "family", "lambda"]

DPI = 130
"""PNG resolution of :func:`save`: at 130 dpi one PNG pixel is one CSS px of the report."""
PAGE_WIDTH_PX = 1150
"""The report's ``body{max-width}``: a wider PNG is shown shrunk to this width."""
MIN_DISPLAY_PT = 9.0
"""The smallest text size, in pt as displayed, that any figure may show."""
MAX_WIDTH_IN = 8.6
"""Widest figure (inches): 8.6 in + the 0.1 in of tight-bbox padding on each side is 8.8 in =
1144 px at 130 dpi, so the PNG is shown unshrunk."""
ANNOT_PT = 7.0
"""The smallest font size used (annotations inside cells): 7 pt at 130 dpi unshrunk shows as 9.5 pt."""
CBAR_IN = 0.8
"""Width reserved for a colour bar with its tick labels and label."""
UNIT = (0.0, 1.0)
"""The scale of every accuracy and probability (colour or axis)."""
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7.5,
         "ytick.labelsize": 7.5, "legend.fontsize": 7.5, "legend.title_fontsize": 7.5, "figure.titlesize": 9,
         "svg.hashsalt": "spatialbias"}
"""Font sizes of every figure (pt), applied by :func:`styled`; SVG ids do not change between runs."""


def displayed_pt(fontsize: float, png_width_px: float, dpi: float = DPI) -> float:
    """The size (pt) at which text of ``fontsize`` pt shows in the report, for a PNG saved at
    ``dpi`` and ``png_width_px`` wide: a PNG pixel is one CSS px at 130 dpi, a PNG wider than
    :data:`PAGE_WIDTH_PX` is shrunk to it, and 1 pt = 4/3 CSS px."""
    return fontsize * (dpi / 72) * min(1.0, PAGE_WIDTH_PX / png_width_px) * 0.75


def styled(fn):
    """Draw the figure function ``fn`` under :data:`STYLE` (a ``plt.rc_context``): every text it
    creates gets the report's font sizes; nothing global changes. The figure is returned closed
    to pyplot (not kept in its registry), so a notebook shows it once — as the cell's value — and
    long runs do not accumulate open figures; ``save`` and ``display`` still work on it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            fig = fn(*args, **kwargs)
        plt.close(fig)
        return fig
    return wrapper


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` with each line wrapped to fit ``width_in`` inches at ``fontsize`` pt: broken at its
    " · " separators first, inside a part (at spaces) only when the part alone is too long."""
    chars = max(12, int(width_in * 72 / (0.55 * fontsize)))
    out = []
    for line in str(text).split("\n"):
        cur = ""
        for part in line.split(" · "):
            if cur and len(cur) + 3 + len(part) <= chars:
                cur += " · " + part
                continue
            if cur:
                out.append(cur + " ·")
            pieces = textwrap.wrap(part, chars, break_long_words=False, break_on_hyphens=False) or [""]
            out.extend(pieces[:-1])
            cur = pieces[-1]
        out.append(cur)
    return "\n".join(out)


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    size = plt.rcParams["figure.titlesize"]
    fig.suptitle(_wrap(text, fig.get_figwidth() - 0.2, size if isinstance(size, (int, float)) else 9))


def _as_list(x: Labels) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def select(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
           analysis: Labels = None, metric: Labels = None) -> pd.DataFrame:
    """Rows matching every given filter (a label or a list of labels; None keeps all)."""
    mask = np.ones(len(df), bool)
    for col, want in (("model", model), ("probe", probe), ("intervention", intervention),
                      ("analysis", analysis), ("metric", metric)):
        want = _as_list(want)
        if want is not None:
            mask &= df[col].isin(want).to_numpy()
    return df[mask]


def intervention_order(df: pd.DataFrame) -> list[str]:
    """Intervention labels in display order: by family (baseline, BaPA, AGCI, adaptive AGCI,
    positions, others), then λ, then the plain variant before derived ones ('agci:0.5' before
    'agci-pooled:0.5'), then label."""
    u = df[["intervention", "family", "lambda"]].drop_duplicates("intervention")
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}

    def key(r):
        lam = r["lambda"]
        return (rank.get(r["family"], len(rank)), str(r["family"]),
                math.inf if pd.isna(lam) else float(lam), len(str(r["intervention"]).split(":")[0]),
                str(r["intervention"]))
    return [r["intervention"] for r in sorted(u.to_dict("records"), key=key)]


def family_sorted(families: Iterable[str]) -> list[str]:
    """Distinct families in display order (:data:`FAMILY_ORDER`, then others by name)."""
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(set(families), key=lambda f: (rank.get(f, len(rank)), str(f)))


def family_colours(families: Iterable[str]) -> dict[str, str]:
    """Family → colour; the five known families keep their colour in every figure."""
    out, extra = {}, iter(_EXTRA_COLOURS * 10)
    for f in family_sorted(families):
        out[f] = FAMILY_COLOURS.get(f) or next(extra)
    return out


def seed_mean(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean over seeds of ``value`` per ``by`` (rows of one seed are averaged first); adds ``sd``
    (across seeds, ddof=1; NaN with one seed) and ``n_seeds``. Missing keys (NaN λ, null
    cell/layer/site) form their own groups."""
    per_seed = df.groupby(by + ["seed"], dropna=False, sort=True)["value"].mean().reset_index()
    g = per_seed.groupby(by, dropna=False, sort=True)["value"]
    return g.agg(value="mean", sd="std", n_seeds="count").reset_index()


def _wide(agg: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A :func:`seed_mean` table over ``keys + ['metric']`` as one row per ``keys``: columns
    ``<metric>`` (mean) and ``<metric>_sd``."""
    w = agg.set_index(keys + ["metric"])[["value", "sd"]].unstack("metric")
    w.columns = [m if stat == "value" else f"{m}_sd" for stat, m in w.columns]
    return w.reset_index()


def _one(df: pd.DataFrame, col: str, what: str) -> str:
    vals = sorted(df[col].dropna().unique())
    if len(vals) != 1:
        raise SpatialBiasError(f"{what}: the selection holds {len(vals)} {col}s "
                               f"({', '.join(map(str, vals)) or 'none'}); pass {col}=... to choose one")
    return vals[0]


def _pick(df: pd.DataFrame, what: str, analysis: str, metric: Labels, model, probe, intervention):
    d = select(df, model, probe, intervention, analysis, metric)
    if d.empty:
        raise SpatialBiasError(f"{what}: no {analysis} rows match model={model!r} probe={probe!r} "
                               f"intervention={intervention!r}; check the labels in the results table")
    return d, _one(d, "model", what), _one(d, "probe", what)


def _t(label) -> str:
    """A label safe for matplotlib text (a '$' would start mathtext)."""
    return str(label).replace("$", r"\$")


def _pm(m: float, sd: float, fmt: str = ".2f") -> str:
    if pd.isna(m):
        return ""
    return f"{m:{fmt}}" if pd.isna(sd) else f"{m:{fmt}}\n±{sd:{fmt}}"


def _seeds_note(d: pd.DataFrame) -> str:
    n = d["seed"].nunique()
    return f"mean of {n} seeds (± sd across seeds)" if n > 1 else "1 seed"


def grid_shape(df: pd.DataFrame, probe: str, n_cells: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a probe's grid: the ``grid_rows``/``grid_cols`` scalars when present,
    else 3×3 for 9 cells, a square for a square count, else one row."""
    d = select(df, probe=probe, metric=["grid_rows", "grid_cols"])
    if not d.empty and set(d.metric) == {"grid_rows", "grid_cols"}:
        r = int(d[d.metric == "grid_rows"].value.iloc[0])
        c = int(d[d.metric == "grid_cols"].value.iloc[0])
        return r, c
    if n_cells is None or n_cells == 9:
        return 3, 3
    s = int(round(math.sqrt(n_cells)))
    return (s, s) if s * s == n_cells else (1, n_cells)


def _grid(values: pd.Series, cells: pd.Series, shape: tuple[int, int]) -> np.ndarray:
    g = np.full(shape[0] * shape[1], np.nan)
    for c, v in zip(cells.astype(int), values):
        if 0 <= c < g.size:
            g[c] = v
    return g.reshape(shape)


def _heat(ax, grid: np.ndarray, annot: np.ndarray, vmin: float, vmax: float, cmap: str,
          fontsize: float = ANNOT_PT, square: bool = True, xlabels=None, ylabels=None):
    """A small annotated heatmap (row 0 at the top). Like seaborn's, without its full-figure
    redraw per panel (what made many-panel figures slow); NaN cells stay blank. Returns the mesh
    (for :func:`_colourbar`)."""
    cm = plt.get_cmap(cmap)
    norm = matplotlib.colors.Normalize(vmin, vmax)
    mesh = ax.pcolormesh(np.ma.masked_invalid(np.asarray(grid, float)), cmap=cm, norm=norm)
    ax.set_xlim(0, grid.shape[1])
    ax.set_ylim(grid.shape[0], 0)
    if square:
        ax.set_aspect("equal")
    for (i, j), v in np.ndenumerate(np.asarray(grid, float)):
        if np.isfinite(v) and annot[i, j]:
            r, g, b, _ = cm(norm(v))
            lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
            ax.text(j + 0.5, i + 0.5, annot[i, j], ha="center", va="center", fontsize=max(fontsize, ANNOT_PT),
                    color="black" if lum > 0.408 else "white")
    ax.set_xticks(np.arange(grid.shape[1]) + 0.5 if xlabels is not None else [],
                  [_t(x) for x in xlabels] if xlabels is not None else [])
    ax.set_yticks(np.arange(grid.shape[0]) + 0.5 if ylabels is not None else [],
                  [_t(y) for y in ylabels] if ylabels is not None else [])
    ax.tick_params(length=0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    return mesh


def _colourbar(mesh, cax, label: str = "", extend: str = "neither"):
    """The one colour bar of a figure's heatmap panels (they share ``mesh``'s norm); horizontal
    when ``cax`` is wider than tall (the bar above very tall panels, :func:`_heat_figure`)."""
    pos = cax.get_position()
    horizontal = pos.width * cax.figure.get_figwidth() > pos.height * cax.figure.get_figheight()
    cb = cax.figure.colorbar(mesh, cax=cax, extend=extend, orientation="horizontal" if horizontal else "vertical")
    if label:
        cb.set_label(label)
    if horizontal:
        cax.xaxis.set_ticks_position("top")
        cax.xaxis.set_label_position("top")
    return cb


def _panels(n: int, panel_width: float, budget: float = MAX_WIDTH_IN) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels of ``panel_width`` inches: as many columns as fit in
    ``budget`` inches (at least one), then as many rows as needed."""
    cols = max(1, min(n, int(budget / panel_width + 1e-6)))
    return math.ceil(n / cols), cols


def _heat_figure(n: int, panel_w: float, panel_h: float, head_h: float = 0.5, row_starts: list[int] | None = None,
                 label_w: float = 0.0):
    """A figure of ``n`` heatmap panels (each ``panel_w`` × ``panel_h`` inches with its title and
    labels) wrapped into rows within :data:`MAX_WIDTH_IN`, and one colour-bar axis, laid out by
    matplotlib's constrained layout (titles never overlap the panel above); returns (fig, panel
    axes, colour-bar axis). The colour bar stands beside the first rows (at most 6 in of them);
    above panels taller than that (a 32-layer patching map), it lies across the top.
    ``label_w``: room for the row labels, which only the first panel of each row shows
    (:func:`_first_col`). ``row_starts``: indices of panels that must begin a new row (e.g. each
    condition of a condition × layer grid)."""
    tall = panel_h > 6.0
    nr, nc = _panels(n, panel_w, MAX_WIDTH_IN - label_w - (0 if tall else CBAR_IN))
    slots, r, c = [], 0, 0
    starts = set(row_starts or [])
    for k in range(n):
        if k and (c == nc or k in starts):
            r, c = r + 1, 0
        slots.append((r, c))
        c += 1
    nr = r + 1 if n else 1
    nc = max((j for _, j in slots), default=0) + 1
    if tall:
        fig = plt.figure(figsize=(min(MAX_WIDTH_IN, nc * panel_w + label_w), nr * panel_h + head_h + 0.7),
                         layout="constrained")
        gs = fig.add_gridspec(nr + 1, nc, height_ratios=[0.12 / panel_h] + [1] * nr)
        axes = [fig.add_subplot(gs[i + 1, j]) for i, j in slots]
        cax = fig.add_subplot(gs[0, :max(1, nc - 1)] if nc > 2 else gs[0, :])
        return fig, axes, cax
    fig = plt.figure(figsize=(min(MAX_WIDTH_IN, nc * panel_w + label_w + CBAR_IN), nr * panel_h + head_h),
                     layout="constrained")
    gs = fig.add_gridspec(nr, nc + 1, width_ratios=[1] * nc + [0.12 / panel_w])
    axes = [fig.add_subplot(gs[i, j]) for i, j in slots]
    cax = fig.add_subplot(gs[:max(1, min(nr, int(6.0 / panel_h))), -1])
    return fig, axes, cax


def _first_col(ax) -> bool:
    """Whether ``ax`` is the first panel of its row (the one that shows the row labels)."""
    return ax.get_subplotspec().is_first_col()


def _label_points(ax, xs: np.ndarray, ys: np.ndarray, labels: list[str], fontsize: float = ANNOT_PT) -> None:
    """Write each label beside its point, moved up or down (greedily, in label order) so that
    labels of coinciding or close points do not overlap."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    bb = ax.get_position()
    w_pt, h_pt = bb.width * ax.figure.get_figwidth() * 72, bb.height * ax.figure.get_figheight() * 72
    placed: list[tuple[float, float, float, float]] = []
    line = fontsize * 1.25
    for x, y, label in zip(xs, ys, labels):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        px, py = (x - x0) / ((x1 - x0) or 1) * w_pt + 3, (y - y0) / ((y1 - y0) or 1) * h_pt
        width = 0.55 * fontsize * len(str(label))
        for k in range(40):
            dy = 3 + (k + 1) // 2 * line * (1 if k % 2 == 0 else -1)
            box = (px, py + dy, px + width, py + dy + line)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(_t(label), (x, y), xytext=(3, dy), textcoords="offset points", fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if abs(dy) > line else None)


def save(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` atomically (no dates inside: the same figure gives the
    same bytes); closes the figure; returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    out_dir = Path(out_dir)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # render off-screen whatever backend a notebook chose
    paths = []
    for ext, kw in (("png", {"dpi": DPI}), ("svg", {"metadata": {"Date": None}})):
        buf = io.BytesIO()
        with plt.rc_context({"svg.hashsalt": STYLE["svg.hashsalt"]}):
            fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
        p = out_dir / f"{stem}.{ext}"
        atomic_write_bytes(p, buf.getvalue())
        paths.append(p)
    plt.close(fig)
    return paths

"""``pairs``: the diagnosis' components for more cell pairs than best → worst. The cells are ranked
by the baseline's accuracy on the held-out items (:func:`analyses.tasks.held_out_accuracy`, the
ranking ``cells = "auto"`` uses), and option ``pairs`` chooses the pairs: an integer k — the best
cell against each of the k worst (default 3) — or ``"all"``, every unordered pair of cells (clean =
the better-ranked one; 36 on a 3×3 grid). Each pair is patched on the same items, which are not
the held-out ones.

Per pair (``group`` = ``"clean→corrupt"``, ``cell`` = the corrupt cell): ``pair_gap`` (mean clean −
corrupt answer logit difference, with its interval) and ``pair_gap_read``, and the components of
:mod:`analyses.diagnosis` as shares of that pair's gap — ``pair_position_restoration`` (P: the
LM's position ids of the two cells swapped in all layers; not under BaPA, whose one shared id
makes it zero by construction), ``pair_moved`` (V), ``pair_joint`` (J) and ``pair_vision_position``
(Q, where the vision tower has a learned position table the grid divides). A ratio whose pair's
gap is not clearly above :data:`analyses.causal.MIN_GAP` is "not read" (NaN; the per-item table
keeps the numbers).
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from analyses import causal
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, held_out_accuracy, pairs_of, patched_count, rng_of
from spatialbias.errors import SpatialBiasError

COMPONENTS = {"pair_position_restoration": "P", "pair_moved": "V", "pair_joint": "J", "pair_vision_position": "Q"}
"""Row metric → the diagnosis' component letter."""


def cell_pairs(acc: np.ndarray, which) -> list[tuple[int, int]]:
    """(clean, corrupt) pairs from per-cell accuracies ``acc`` (cells,): ``which`` = k, the best cell
    against the k worst (worst first), or ``"all"``, every unordered pair with the better-ranked
    cell clean. Ties go to the lower cell index, as ``cells = "auto"`` (argmax / argmin) does: the
    best is the first maximum, the worst the first minimum."""
    order = sorted(range(len(acc)), key=lambda c: (-np.nan_to_num(acc[c], nan=-1.0), c))  # best first
    rank = {c: i for i, c in enumerate(order)}
    if which == "all":
        return [(a, b) if rank[a] < rank[b] else (b, a) for a, b in itertools.combinations(range(len(acc)), 2)]
    best = order[0]
    worst = sorted((c for c in order if c != best), key=lambda c: (np.nan_to_num(acc[c], nan=-1.0), c))
    return [(best, c) for c in worst[:int(which)]]


def pair_items(lvlm, pairs, ivs, family: str, fwd: int, patch: int) -> pd.DataFrame:
    """Per item of one pair: ``clean``, ``corrupt`` and each component's patched metric (columns
    P, V, J, Q; P absent under BaPA, Q where the tower has no patchable position code)."""
    from interp.interventions import PositionSwap
    clean = causal.item_metric(lvlm, pairs.clean, pairs, ivs, fwd)
    corrupt = causal.item_metric(lvlm, pairs.corrupt, pairs, ivs, fwd)
    d = pd.DataFrame({"item": range(len(clean)), "id": pairs.ids, "clean": clean, "corrupt": corrupt})
    if family != "bapa":
        swap = PositionSwap(a=pairs.corrupt_cell, b=pairs.clean_cell, layers=None, grid=pairs.grid)
        d["P"] = causal.item_metric(lvlm, pairs.corrupt, pairs, list(ivs) + [swap], fwd)
    for col, fn in (("V", causal.moved_items), ("J", causal.joint_items)):
        d[col] = fn(lvlm, pairs, ivs, patch).sort_values("item").metric.to_numpy()
    q = causal.vision_position_items(lvlm, pairs, ivs, fwd)
    if q is not None:
        d["Q"] = q.sort_values("item").metric.to_numpy()
    return d.assign(clean_cell=pairs.clean_cell, corrupt_cell=pairs.corrupt_cell)


def pair_rows(d: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """The rows of one pair's per-item table (module doc)."""
    key = {"cell": int(d.corrupt_cell.iloc[0]), "group": f"{int(d.clean_cell.iloc[0])}→{int(d.corrupt_cell.iloc[0])}"}
    arrays = {"clean": d.clean.to_numpy(), "corrupt": d.corrupt.to_numpy()}
    gap = causal._point_ci(arrays, lambda clean, corrupt: clean - corrupt, rng)
    read = gap["ci_low"] == gap["ci_low"] and gap["ci_low"] >= causal.MIN_GAP
    rows = [{"metric": "pair_gap", **key, **gap}, {"metric": "pair_gap_read", **key, "value": float(read)}]
    nan = {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    for metric, col in COMPONENTS.items():
        if col in d:
            v = causal._point_ci({**arrays, "p": d[col].to_numpy()},
                                 lambda p, clean, corrupt: (p - corrupt) / (clean - corrupt), rng)
            rows.append({"metric": metric, **key, **(v if read else nan)})
    return rows


def run(lvlm, cond, ctx: Context):
    which = cond.options.get("pairs", 3)
    acc = held_out_accuracy(lvlm, cond, ctx)
    ivs, rng = cond.build(), rng_of(cond)
    first = pairs_of(lvlm, cond, ctx, cell_pairs(acc, which)[0])
    fwd = ctx.rows(lvlm, "forward", first.clean, "pairs")
    patch = ctx.rows(lvlm, "patching", first.clean, "pairs")
    frames, rows = [], []
    for clean, corrupt in cell_pairs(acc, which):
        d = pair_items(lvlm, pairs_of(lvlm, cond, ctx, (clean, corrupt)), ivs, cond.family, fwd, patch)
        frames.append(d)
        rows += pair_rows(d, rng)
    rows += [{"metric": "held_out_accuracy", "cell": c, "value": float(a)} for c, a in enumerate(acc)]
    return rows + [{"metric": "n_items", "value": float(len(first.ids))}], pd.concat(frames, ignore_index=True)


def check(opts: dict, where: str) -> dict:
    k = opts.get("pairs", 3)
    if k != "all" and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise SpatialBiasError(f"{where}: pairs = {k!r}; use a number k (the best cell against the k worst) or "
                               "\"all\" (every pair of cells)")
    return opts


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    """Per pair and item: clean, corrupt, the position swap, the moved and joint patches (3 rows
    each) and the vision position patch (3): 12 rows; plus the held-out baseline pass."""
    cells = max(1, round(probe_rows / max(items, 1)))
    n = patched_count(items, cond.options.get("items") or 20)  # the cells are always ranked on held-out items
    auto = cells * (items - n)
    k = cond.options.get("pairs", 3)
    n_pairs = cells * (cells - 1) // 2 if k == "all" else min(int(k), cells - 1)
    return n_pairs * n * 12 + auto


def summary(p: pd.DataFrame, order: list[str]) -> dict:
    """``pairs``: per intervention one entry per pair — clean, corrupt, gap and P/V/J/Q (None: n/a)."""
    from analyses.blocks import vci
    if not (p.metric == "pair_gap").any():
        return {}
    out = {}
    for iv in order:
        d = p[p.intervention == iv]
        if d.empty:
            continue
        entries = []
        for group, g in d[d.group.notna()].groupby("group", sort=False):
            at = {r.metric: r._asdict() for r in g.itertuples()}
            clean, corrupt = (int(x) for x in str(group).split("→"))
            entries.append({"clean": clean, "corrupt": corrupt, "gap": vci(at["pair_gap"]),
                            **{c: vci(at[m]) if m in at else None for m, c in COMPONENTS.items()}})
        out[iv] = entries
    return {"pairs": out}


def claims(run: dict) -> list:
    """Each pair's gap (the shares are in the figure and the table)."""
    return [(f"cell pair {e['clean']} → {e['corrupt']}: gap (clean − corrupt answer logit difference)", iv, e["gap"])
            for iv, es in run["causal"].get("pairs", {}).items() for e in es]


def figures(df, tables) -> list[FigureSpec]:
    return [FigureSpec("pairs", stem("pairs_", m, p), "pair_components", {"model": m, "probe": p}, f"{m} · {p}")
            for m, p in model_probes(having(df, "pairs", "pair_gap"))]


PAIRS = register(Analysis(
    "pairs", run, cost, options={"items": None, "pairs": 3}, check=check, profile=lambda opts: ("forward", "patching"),
    causal=True, summary=summary, claims=claims, figures=figures,
    sections=(Section("pairs", "Cell pairs", "The diagnosis' components (P, V, J, Q) for the best cell against the "
                      "worst few, or every pair of cells: whether best → worst is typical."),)))

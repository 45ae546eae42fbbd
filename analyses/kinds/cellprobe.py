"""``cellprobe``: linear probes decoding the target's cell from the target's own image tokens at
every vision block, the projector, ``lm.input`` and every LM block — where position is *present*
in the activations — to set beside activation patching's restoration at the same sites (where it
is *used*).

Features: per probe row and site, the mean of the target cell's image tokens (the cell the row
places the target in; tokens mapped to cells by the site's token map, :meth:`interp.model.LVLM.token_map`,
so vision sites, the projector and LM sites are read alike). Label: that cell (0 … n·m−1).

Classifier: ridge classification (closed-form ridge regression on one-hot labels, features
standardised on the training folds, ``alpha`` = 1 by default, predicted class = argmax), in
k-fold cross-validation grouped by item (an item's placements are all in train or all in test).
Control: the same pipeline on labels permuted across all rows (a seeded permutation), which no
feature can predict: its accuracy measures what the probe fits by itself. Selectivity =
accuracy − control. Each has a bootstrap 95% interval over items (resampled jointly).

What the target's tokens hold is the same shape and colour wherever it stands, so decoding its
cell from them reads *position* information: CLIP adds learned absolute position embeddings to
its patches, so vision sites should decode the cell; 1-D RoPE (and M-RoPE) rotates queries and
keys inside attention and never adds to the residual stream, so an LM's residual may hold little
cell information even where its attention uses position. Decodable is not used: a site may carry
the cell without the answer depending on it (that is what patching measures).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analyses import causal
from analyses.kinds.lens import batches, cost, lm_sites
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, rng_of
from spatialbias.errors import SpatialBiasError


def probe_sites(lvlm) -> list[tuple[str, int | None]]:
    """(site, layer) from the image to the answer: every vision block, the projector, ``lm.input``
    and every LM block (layer None for the projector and ``lm.input``)."""
    n = lvlm.adapter.layer_count(lvlm.model, "vision")
    return [(f"vision.blocks.{i}", i) for i in range(n)] + [("projector", None)] + lm_sites(lvlm)


def features(lvlm, cond, ctx: Context) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[str], int]:
    """({site: (N, D) mean of the target cell's tokens}, (N,) labels (the target's cell), (N,) item
    index, item ids, cells of the grid) over the condition's items at every placement."""
    from interp.tracing import trace
    grid, _, _, ids, gen = batches(lvlm, cond, ctx)
    sites, ivs = probe_sites(lvlm), cond.build()
    feats: dict[str, list] = {s: [] for s, _ in sites}
    labels, items = [], []
    index = {i: k for k, i in enumerate(ids)}
    for _, batch, inputs in gen:
        target = torch.tensor([r.cell for r in batch])
        reduce = {s: _cell_mean(lvlm.token_map(inputs, s), target, grid, s) for s, _ in sites}
        tr = trace(lvlm, inputs, cache=list(reduce), interventions=ivs, reduce=reduce)
        for s in feats:
            feats[s].append(tr.cache[s].double().numpy())
        labels += [r.cell for r in batch]
        items += [index[r.id] for r in batch]
    return ({s: np.concatenate(v) for s, v in feats.items()}, np.array(labels), np.array(items), ids,
            grid[0] * grid[1])


def _cell_mean(tmap, target: torch.Tensor, grid, site: str):
    """``fn(x)`` → (B, D): per batch row the mean of its tokens in that row's target cell (NaN where
    it has none), ``x`` being the site's tensor flattened to (T, D) in the site's token order."""
    cells, row = tmap.cells(*grid), tmap.batch_row
    t = ((row >= 0) & (cells == target.to(cells.device)[row.clamp(min=0)])).nonzero().flatten()
    b, n_tokens, n_rows = row[t], len(cells), len(target)

    def fn(x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != n_tokens:
            raise SpatialBiasError(f"cellprobe: {site} holds {flat.shape[0]} tokens, its token map {n_tokens}")
        i = b.to(flat.device)
        s = torch.zeros(n_rows, flat.shape[1], device=flat.device).index_add_(0, i, flat[t.to(flat.device)].float())
        n = torch.zeros(n_rows, device=flat.device).index_add_(0, i, torch.ones(len(i), device=flat.device))
        return (s / n[:, None]).cpu()
    return fn


def ridge_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, folds: int = 5,
             alpha: float = 1.0) -> np.ndarray:
    """(N,) out-of-fold predictions of a ridge classifier (closed form on one-hot labels, features
    standardised on the training rows, intercept by centring): group ``g`` is in fold ``g mod k``,
    k = min(``folds``, groups). Deterministic; the dual form when features outnumber rows."""
    x = torch.as_tensor(x, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), n_classes).double()
    k = min(folds, len(np.unique(groups)))
    if k < 2:
        raise SpatialBiasError("cellprobe: cross-validation needs at least 2 items; raise items")
    fold = torch.as_tensor(np.unique(groups, return_inverse=True)[1] % k)
    pred = torch.empty(len(y), dtype=torch.long)
    for f in range(k):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0)
        sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
        a, b = (x[tr] - mu) / sd, (x[te] - mu) / sd
        ym = onehot[tr].mean(0)
        yc = onehot[tr] - ym
        if a.shape[1] <= a.shape[0]:
            w = torch.linalg.solve(a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype), a.T @ yc)
        else:
            w = a.T @ torch.linalg.solve(a @ a.T + alpha * torch.eye(a.shape[0], dtype=a.dtype), yc)
        pred[te] = (b @ w + ym).argmax(1)
    return pred.numpy()


def probe_items(feats: dict[str, np.ndarray], labels: np.ndarray, items: np.ndarray, ids: list[str],
                n_classes: int, rng: np.random.Generator, folds: int = 5, alpha: float = 1.0) -> pd.DataFrame:
    """One row per probe row × site: its cell, the out-of-fold prediction and the control's (labels
    permuted across all rows, one permutation shared by the sites)."""
    control = labels[rng.permutation(len(labels))]
    frames = []
    for s, x in feats.items():
        if np.isnan(x).any():  # some target cell holds no token of this site (a coarse token grid)
            continue
        pred = ridge_cv(x, labels, items, n_classes, folds, alpha)
        ctl = ridge_cv(x, control, items, n_classes, folds, alpha)
        frames.append(pd.DataFrame({"item": items, "id": [ids[i] for i in items], "site": s, "target_cell": labels,
                                    "pred": pred, "correct": pred == labels, "control_label": control,
                                    "control_pred": ctl, "control_correct": ctl == control}))
    return pd.concat(frames, ignore_index=True)


def probe_rows_of(d: pd.DataFrame, layers: dict[str, int | None], n_classes: int, rng) -> list[dict]:
    """``cellprobe_accuracy``, ``cellprobe_control`` and ``cellprobe_selectivity`` per site (items
    resampled jointly), ``cellprobe_chance`` (1 / cells), and ``cellprobe_unresolved`` (value 1) per
    site where some target cell holds none of the site's tokens (no probe there)."""
    rows = [{"metric": "cellprobe_unresolved", "site": s, "layer": layer, "value": 1.0}
            for s, layer in layers.items() if s not in set(d.site)]
    for s, g in d.groupby("site", sort=False):
        per = g.groupby("item")[["correct", "control_correct"]].mean()
        arrays = {"acc": per["correct"].to_numpy(float), "ctl": per["control_correct"].to_numpy(float)}
        for metric, fn in (("cellprobe_accuracy", lambda acc, ctl: acc), ("cellprobe_control", lambda acc, ctl: ctl),
                           ("cellprobe_selectivity", lambda acc, ctl: acc - ctl)):
            rows.append({"metric": metric, "site": s, "layer": layers[s], **causal._point_ci(arrays, fn, rng)})
    return rows + [{"metric": "cellprobe_chance", "value": 1.0 / n_classes},
                   {"metric": "n_items", "value": float(d["item"].nunique())}]


def run(lvlm, cond, ctx: Context):
    feats, labels, items, ids, n = features(lvlm, cond, ctx)
    rng = rng_of(cond)
    if len(ids) < 2:  # e.g. `spatialbias causal --n-items 1`: nothing to cross-validate, nothing fails
        return [{"metric": "n_items", "value": float(len(ids))}], None
    d = probe_items(feats, labels, items, ids, n, rng, cond.options.get("folds", 5), cond.options.get("alpha", 1.0))
    return probe_rows_of(d, dict(probe_sites(lvlm)), n, rng), d


def check(opts: dict, where: str) -> dict:
    k, a = opts.get("folds"), opts.get("alpha")
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise SpatialBiasError(f"{where}: [analysis.cellprobe] folds must be an integer ≥ 2, got {k!r}")
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not a > 0:
        raise SpatialBiasError(f"{where}: [analysis.cellprobe] alpha must be a positive number, got {a!r}")
    return opts


def summary(f: pd.DataFrame, order: list[str]) -> dict:
    """``cellprobe``: per intervention and site the decoding accuracy, control and selectivity."""
    from analyses.blocks import vci
    f = f[f.metric.isin(["cellprobe_accuracy", "cellprobe_control", "cellprobe_selectivity"])]
    if not len(f):
        return {}
    return {"cellprobe": {iv: {s: {r.metric.split("_")[1]: vci(r._asdict()) for r in g.itertuples()}
                               for s, g in f[f.intervention == iv].groupby("site", sort=False)}
                          for iv in order if iv in set(f.intervention)}}


def claims(run: dict) -> list:
    """Selectivity of the cell probe at the projector, the LM input and the last LM block."""
    out = []
    for iv, by_site in run["causal"].get("cellprobe", {}).items():
        lm = [s for s in by_site if s.startswith("lm.blocks.")]
        for s in [x for x in ("projector", "lm.input") if x in by_site] + lm[-1:]:
            out.append((f"cell probe at {s}: decoding accuracy − shuffled-label control", iv,
                        by_site[s]["selectivity"]))
    return out


def figures(df, tables) -> list[FigureSpec]:
    return [FigureSpec("cell-probes", stem("cellprobe_", m, p), "cellprobe_accuracy", {"model": m, "probe": p},
                       f"{m} · {p}")
            for m, p in model_probes(having(df, "cellprobe", "cellprobe_accuracy", site=1))]


CELLPROBE = register(Analysis(
    "cellprobe", run, cost, options={"items": None, "folds": 5, "alpha": 1.0}, check=check,
    profile=lambda opts: "forward", causal=True, items_cap=50, summary=summary, claims=claims, figures=figures,
    sections=(Section("cell-probes", "Cell-identity probes", "Cross-validated linear decoding of the target's cell "
                      "from its own image tokens at every site, against a shuffled-label control, beside patching's "
                      "restoration at the same sites: where position is present versus where it is used."),)))

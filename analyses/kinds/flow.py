"""``flow``: attention from the query token (the last, by default) to every cell of the grid,
per layer, at each placement of the target; its spread over placements per layer."""
from __future__ import annotations

import pandas as pd

from analyses import causal
from analyses.kinds.patching import causal_sizes
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, probe_rows, rng_of


def run(lvlm, cond, ctx: Context):
    items = causal.flow_items(lvlm, cond.probe_path, cond.build(), cond.options["items"],
                              cond.options.get("query", "last"), batch_size=_rows(lvlm, cond, ctx))
    return causal.flow_rows(items, rng_of(cond)), items


def _rows(lvlm, cond, ctx: Context) -> int | None:
    if ctx.budget is None:
        return None  # one forward per target cell
    from probes.format import read_rows
    return probe_rows(lvlm, cond, ctx, read_rows(cond.probe_path)[:8], "flow")  # no cells needed (no pairs)


def cost(cond, probe_rows_: int, items: int, lm_layers: int) -> int:
    cells, n, _ = causal_sizes(cond, probe_rows_, items)
    return cells * n


def summary(f: pd.DataFrame, order: list[str]) -> dict:
    """``flow``: per intervention and layer the attention to the target's cell at each placement;
    ``flow_spread``: its max − min over placements per layer."""
    from analyses.blocks import vci
    out = {}
    a = f[f.metric == "attention_to_target"]
    if len(a):
        out["flow"] = {iv: {int(layer): [vci(r) for r in g.sort_values("cell").to_dict("records")]
                            for layer, g in a[a.intervention == iv].groupby("layer")}
                       for iv in order if iv in set(a.intervention)}
    sp = f[f.metric == "attention_spread"]
    if len(sp):
        out["flow_spread"] = {iv: {int(r.layer): vci(r._asdict()) for r in sp[sp.intervention == iv].itertuples()}
                              for iv in order if iv in set(sp.intervention)}
    return out


def claims(run: dict) -> list:
    return [(f"attention to the target's cell, layer {layer}: spread (max − min) over placements", iv, x)
            for iv, by_layer in run["causal"].get("flow_spread", {}).items() for layer, x in by_layer.items()]


def figures(df, tables) -> list[FigureSpec]:
    specs = []
    for m, p in model_probes(having(df, "flow", "attention_to_target", cell=1, layer=1)):
        specs.append(FigureSpec("attention-flow", stem("attention_to_target_", m, p), "attention_to_target",
                                {"model": m, "probe": p}, f"{m} · {p}"))
        if "flow" in tables:
            specs.append(FigureSpec("attention-flow", stem("attention_layer_cell_", m, p), "layer_cell",
                                    {"model": m, "probe": p}, f"per layer and cell · {m} · {p}", details="flow"))
    return specs


FLOW = register(Analysis(
    "flow", run, cost, options={"items": None, "query": "last"}, profile=lambda opts: "flow", causal=True, items_cap=50,
    summary=summary, claims=claims, figures=figures,
    sections=(Section("attention-flow", "Attention flow", "Attention from the last token to the target's cell at each "
                      "placement, and to every cell per layer."),)))

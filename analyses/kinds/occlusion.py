"""``occlusion``: the answer logit difference's change per occluder offset and region."""
from __future__ import annotations

from analyses.kinds.eval import PROBE_SIDE
from analyses.registry import Analysis, FigureSpec, model_probes, register, stem
from analyses.tasks import Context


def run(lvlm, cond, ctx: Context):
    from analyses import occlusion as occ
    df = occ.occlusion_scores(lvlm, cond.probe_path, {cond.intervention: cond.build()}, steps=cond.options["steps"],
                              square=cond.options.get("square"), batch_size=ctx.batch_size, progress=ctx.progress)
    rows = [{"metric": "occlusion_mean_abs_delta", "cell": int(r.cell), "group": str(r.region),
             "value": float(r.mean_abs_delta)} for r in occ.region_table(df).itertuples()]
    return rows, df


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    return probe_rows * (cond.options.get("steps", 20) ** 2 + 1)


def figures(df, tables) -> list[FigureSpec]:
    if "occlusion" not in tables:
        return []
    return [FigureSpec("probe-side", stem("occlusion_", m, p), "occlusion_maps", {"model": m, "probe": p},
                       f"occlusion · {m} · {p}", details="occlusion") for m, p in model_probes(tables["occlusion"])]


OCCLUSION = register(Analysis("occlusion", run, cost, options={"steps": 20, "square": None}, figures=figures,
                              sections=(PROBE_SIDE,)))

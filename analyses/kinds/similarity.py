"""``similarity``: caption vs image-token cosine (the paper's similarity score) per cell and pooling."""
from __future__ import annotations

from analyses.kinds.eval import PROBE_SIDE
from analyses.registry import Analysis, FigureSpec, having, model_probes, register, stem
from analyses.tasks import Context


def run(lvlm, cond, ctx: Context):
    from analyses.similarity import similarity_scores, similarity_summary
    df = similarity_scores(lvlm, cond.probe_path, batch_size=ctx.batch_size, progress=ctx.progress)
    rows = []
    for how, block in similarity_summary(df).items():
        for key in ("sim_image", "sim_cell"):
            rows += [{"metric": f"cell_{key}", "group": how, "cell": c, "value": v}
                     for c, v in enumerate(block[f"cell_{key}"])]
            rows.append({"metric": f"range_{key}", "group": how, "value": block[f"range_{key}"]})
    return rows, df


def figures(df, tables) -> list[FigureSpec]:
    return [FigureSpec("probe-side", stem("similarity_", m, p), "similarity_maps", {"model": m, "probe": p},
                       f"similarity · {m} · {p}") for m, p in model_probes(having(df, "similarity", "cell_sim_image"))]


SIMILARITY = register(Analysis("similarity", run, lambda cond, rows, items, layers: rows, baseline_only=True,
                               figures=figures, sections=(PROBE_SIDE,)))

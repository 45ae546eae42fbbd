"""The blind, pre-registered test of the decomposing diagnosis (docs/diagnosis_preregistration.md).

Role: one campaign through the plan / runner / store, then the diagnosis of every model against
the label kinds fixed before it ran. May import: ``spatialbias``, ``interp``, ``analyses.{plan,
runner, diagnosis}``, ``analyses.organisms.{zoo}``. Every model is copied into ``OUT/models``
without its training record, so it is diagnosed exactly as a user's checkpoint.

    python -m analyses.organisms.blind --out OUT [--ckpt DIR]   # DIR: trained seeds {recipe}-seed{s}
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from analyses.diagnosis import LM_IDS, NONE, ORDER, VISION, VISION_CODE, diagnose, kind
from spatialbias.files import atomic_write_text

MIX = f"{LM_IDS} + {VISION}"
MIX_CODE = f"{LM_IDS} + {VISION_CODE}"
MODELS: dict[str, tuple[str, int, set[str]]] = {
    **{f"planted-lm-s{s}": ("planted-lm", s, {LM_IDS}) for s in (0, 1, 2)},
    "learned-absolute-s0": ("learned-absolute", 0, {LM_IDS}),
    "mrope-s0": ("mrope", 0, {LM_IDS}),
    **{f"planted-vision-s{s}": ("planted-vision", s, {VISION, VISION_CODE}) for s in (0, 1, 2)},
    **{f"planted-order-s{s}": ("planted-order", s, {ORDER}) for s in (0, 1, 2)},
    **{f"uniform-s{s}": ("uniform", s, {NONE}) for s in (0, 1, 2)},
}
"""name → (recipe, training seed, expected label kinds), as pre-registered."""
MIXTURES: dict[str, tuple[float, set[str]]] = {
    "mixture-weak": (0.5, {LM_IDS, MIX, MIX_CODE}), "mixture-medium": (1.0, {MIX, MIX_CODE}),
    "mixture-strong": (2.0, {MIX, MIX_CODE, VISION, VISION_CODE})}
"""name → (s, expected label kinds): planted-lm seed 0 with cell 0's CLIP position embedding moved
by s × its norm along a fixed random direction."""
NULL_PROBE_SEEDS = tuple(range(100, 120))
PROBE = {"build": "shapes", "n": 300, "seed": 12345, "cell_px": 16}


def mixture(src: Path, s: float, out: Path) -> Path:
    """planted-lm with a vision-side deficit in cell 0: row 1 of CLIP's position embedding (cell
    0's one patch; row 0 is CLS) plus s × its norm along a unit direction drawn with torch seed 0."""
    import torch

    import interp
    m = interp.load(src)
    w = m.adapter.module(m.model, "vision.embed").position_embedding.weight
    g = torch.Generator().manual_seed(0)
    d = torch.randn(w.shape[1], generator=g)
    with torch.no_grad():
        w[1] += s * w[1].norm() * d / d.norm()
    m.model.save_pretrained(out)
    m.processor.save_pretrained(out)
    return out


def models(out: Path, ckpt: Path | None, skip_missing: bool = False) -> dict[str, str]:
    """Every model of the campaign copied (or made) into ``out/models`` without a training record;
    ``skip_missing``: leave out seeds neither shipped nor trained in ``ckpt`` yet (a later run of
    the same command adds them: the plan resumes)."""
    from analyses.organisms.zoo import get, shipped
    dest = out / "models"
    folders = {}
    for name, (recipe, seed, _) in MODELS.items():
        target = dest / name
        if not (target / "model.safetensors").is_file():
            trained = ckpt / f"{recipe}-seed{seed}" if ckpt is not None else None
            have = trained is not None and (trained / "training.json").is_file()
            if skip_missing and not have and shipped(recipe, seed) is None:
                continue
            src = trained if have else get(recipe, seed)
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("training.json", "adapter"), dirs_exist_ok=True)
        folders[name] = str(target)
    for name, (s, _) in MIXTURES.items():
        target = dest / name
        if not (target / "model.safetensors").is_file():
            mixture(Path(folders["planted-lm-s0"]), s, target)
        folders[name] = str(target)
    return folders


def mapping(folders: dict[str, str]) -> dict:
    """The campaign's plan: every model on the main probe (eval under baseline, BaPA, AGCI 0.5;
    patching under baseline, 100 items, auto cells on held-out items), uniform-s0 also on the 20
    null probe seeds (eval)."""
    probes = {"main": dict(PROBE), **{f"null{s}": {**PROBE, "seed": s} for s in NULL_PROBE_SEEDS}}
    return {"seeds": [0], "causal_items": 100, "patch_cells": "auto", "analyses": ["eval", "patching"],
            "models": {n: {"path": p, "probes": (["main", *[f"null{s}" for s in NULL_PROBE_SEEDS]]
                                                 if n == "uniform-s0" else ["main"])} for n, p in folders.items()},
            "probes": probes, "interventions": {"baseline": True, "bapa": ["reference"], "agci": [0.5]},
            "analysis": {"patching": {"interventions": ["baseline"]}}}


def score(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, probe): the diagnosis, its components and whether it is informative and
    matches the pre-registered label kinds."""
    expected = {**{n: e for n, (_, _, e) in MODELS.items()}, **{n: e for n, (_, e) in MIXTURES.items()}}
    rows = []
    for (model, probe), d in df.groupby(["model", "probe"], sort=False):
        null = model.startswith("uniform")
        try:
            dg = diagnose(d, model, probe)
        except Exception as e:  # a false-positive null has no patching rows on the null probes
            dg = {"label": f"bias found, not decomposed ({e})", "p": float("nan"), "components": {}}
        k = kind(dg["label"])
        informative = null or (dg["label"] not in (NONE,) and not dg["label"].startswith("bias not decomposed"))
        c = dg.get("components") or {}
        rows.append({"model": model, "probe": probe, "p": dg.get("p"), "label": dg["label"], "kind": k,
                     "expected": " | ".join(sorted(expected[model])), "informative": informative,
                     "match": k in expected[model],
                     **{f"{x}{s}": (c.get(x) or {}).get(v) for x in ("P", "V", "Q", "J", "R", "I")
                        for s, v in (("", "value"), ("_lo", "ci_low"), ("_hi", "ci_high"))},
                     "gap": (dg.get("gap") or {}).get("value")})
    return pd.DataFrame(rows)


def markdown(tab: pd.DataFrame) -> str:
    def pct(r, x):
        v = r[x]
        return "n/a" if v is None or pd.isna(v) else f"{v:.0%} [{r[x + '_lo']:.0%}, {r[x + '_hi']:.0%}]"
    out = ["| model | probe | paired p | P | V | Q | J | I | label | expected | informative | match |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in tab.iterrows():
        out.append(f"| {r.model} | {r.probe} | {r.p:.2g} | " + " | ".join(pct(r, x) for x in "PVQJI")
                   + f" | {r.label} | {r.expected} | {'yes' if r.informative else 'no'} | "
                   f"{'yes' if r.match else 'no'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--skip-missing", action="store_true")
    a = ap.parse_args(argv)
    from analyses import plan as planmod, runner
    folders = models(a.out, a.ckpt, a.skip_missing)
    plan = planmod.from_mapping(mapping(folders), Path.cwd(), a.out / "run", "blind campaign")
    res = runner.run(plan, a.out / "run", progress=True)
    if res["failed"]:
        raise SystemExit(f"{len(res['failed'])} conditions failed: {res['failed'][0]}")
    tab = score(pd.read_parquet(a.out / "run" / "results.parquet"))
    tab.to_csv(a.out / "blind.csv", index=False)
    atomic_write_text(a.out / "blind.md", markdown(tab))
    inf = tab[tab.informative]
    atomic_write_text(a.out / "blind.json", json.dumps({
        "informative": int(len(inf)), "matches": int(inf.match.sum()),
        "null_runs": int(tab.model.str.startswith("uniform").sum()),
        "null_false_positives": int((tab.model.str.startswith("uniform") & (tab.kind != NONE)).sum())}, indent=1))
    print(markdown(tab))


if __name__ == "__main__":
    main()

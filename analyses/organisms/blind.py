"""The blind, pre-registered test of the decomposing diagnosis (docs/diagnosis_preregistration.md).

Role: one campaign through the plan / runner / store, then the diagnosis of every model against
the label kinds fixed before it ran. May import: ``spatialbias``, ``interp``, ``analyses.{plan,
runner, diagnosis}``, ``analyses.organisms.{zoo}``. Every model is copied into ``OUT/models``
without its training record, so it is diagnosed exactly as a user's checkpoint.

    python -m analyses.organisms.blind --out OUT [--ckpt DIR]   # DIR: trained seeds {recipe}-seed{s}
    python -m analyses.organisms.blind --out OUT2 --round 2       # round 2's mixtures
    python -m analyses.organisms.blind --out OUT3 --round 3       # round 3: the vision-only organism
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from analyses.diagnosis import LM_IDS, NONE, ORDER, VISION, VISION_CODE, diagnose, kind
from spatialbias.errors import SpatialBiasError
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
MIXTURES2: dict[str, tuple[float, set[str]]] = {
    "mixture2-weak": (0.25, {LM_IDS, MIX, MIX_CODE}), "mixture2-medium": (0.5, {MIX, MIX_CODE}),
    "mixture2-strong": (1.0, {MIX, MIX_CODE, VISION, VISION_CODE})}
"""Round 2 (registered after round 1's mixtures planted no deficit): name → (c, expected kinds),
the shift c × the mean patch-content norm at ``vision.embed`` (:func:`content_norm`)."""
ROUND3: dict[str, tuple[str, int, set[str]]] = {"vision-only-s0": ("vision-only", 0, {VISION, VISION_CODE})}
"""Round 3 (registered before its checkpoint was trained): a bias before the LM by construction
(learned CLIP positions, a position-blind LM): name → (recipe, seed, expected label kinds)."""
NULL_PROBE_SEEDS = tuple(range(100, 120))
PROBE = {"build": "shapes", "n": 300, "seed": 12345, "cell_px": 16}


def mixture(src: Path, s: float, out: Path, shift: float | None = None) -> Path:
    """planted-lm with a vision-side deficit in cell 0: row 1 of CLIP's position embedding (cell
    0's one patch; row 0 is CLS) plus s × its norm (or ``shift``, an absolute length) along a unit
    direction drawn with torch seed 0."""
    import torch

    import interp
    m = interp.load(src)
    w = m.adapter.module(m.model, "vision.embed").position_embedding.weight
    g = torch.Generator().manual_seed(0)
    d = torch.randn(w.shape[1], generator=g)
    with torch.no_grad():
        w[1] += (shift if shift is not None else s * w[1].norm()) * d / d.norm()
    m.model.save_pretrained(out)
    m.processor.save_pretrained(out)
    return out


def content_norm(src: Path, probe: Path) -> float:
    """The mean L2 norm of the patch content at ``vision.embed`` (its output minus the position
    embedding) over the patch tokens of the probe's first 18 images, on the model at ``src``."""
    import torch

    import interp
    from analyses.evaluate import load_image
    from interp.tracing import trace
    from probes.format import find_probe, read_rows
    m = interp.load(src)
    rows = read_rows(find_probe(probe))[:18]
    x = m.inputs([load_image(probe, r, r.image) for r in rows], [m.prompt("what colour is the circle ?")] * len(rows))
    with torch.no_grad():
        e = trace(m, x, cache=["vision.embed"]).cache["vision.embed"]
    pe = m.adapter.module(m.model, "vision.embed").position_embedding.weight
    return float((e[:, 1:] - pe[1:]).norm(dim=-1).mean())


def copied(out: Path, name: str, recipe: str, seed: int, ckpt: Path | None = None) -> str:
    """``out/models/name``: the checkpoint of (recipe, seed) — trained in ``ckpt`` if it is there,
    else the zoo's — copied without its training record."""
    from analyses.organisms.zoo import get
    target = out / "models" / name
    if not (target / "model.safetensors").is_file():
        trained = ckpt / f"{recipe}-seed{seed}" if ckpt is not None else None
        src = trained if trained is not None and (trained / "training.json").is_file() else get(recipe, seed)
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("training.json", "adapter"), dirs_exist_ok=True)
    return str(target)


def models(out: Path, ckpt: Path | None, skip_missing: bool = False) -> dict[str, str]:
    """Every model of the campaign copied (or made) into ``out/models`` without a training record;
    ``skip_missing``: leave out seeds neither shipped nor trained in ``ckpt`` yet (a later run of
    the same command adds them: the plan resumes)."""
    from analyses.organisms.zoo import shipped
    dest = out / "models"
    folders = {}
    for name, (recipe, seed, _) in MODELS.items():
        have = ckpt is not None and (ckpt / f"{recipe}-seed{seed}" / "training.json").is_file()
        if skip_missing and not (dest / name / "model.safetensors").is_file() and not have \
                and shipped(recipe, seed) is None:
            continue
        folders[name] = copied(out, name, recipe, seed, ckpt)
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


def round2(out: Path) -> dict[str, str]:
    """Round 2's mixtures in ``out/models`` (the main probe built first, to measure the content norm)."""
    from probes.build import shapes_probe
    from analyses.organisms.zoo import get
    src = get("planted-lm", 0)
    probe = out / "probe-main"
    if not (probe / "probe.jsonl").is_file():
        shapes_probe(probe, n_items=PROBE["n"], seed=PROBE["seed"], cell_px=PROBE["cell_px"], progress=False)
    norm = content_norm(src, probe)
    folders = {}
    for name, (c, _) in MIXTURES2.items():
        target = out / "models" / name
        if not (target / "model.safetensors").is_file():
            mixture(src, 0.0, target, shift=c * norm)
        folders[name] = str(target)
    atomic_write_text(out / "content_norm.json", json.dumps({"content_norm": norm}))
    return folders


def score(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, probe): the diagnosis, its components and whether it is informative and
    matches the pre-registered label kinds."""
    expected = {**{n: e for n, (_, _, e) in MODELS.items()}, **{n: e for n, (_, e) in MIXTURES.items()},
                **{n: e for n, (_, e) in MIXTURES2.items()}, **{n: e for n, (_, _, e) in ROUND3.items()}}
    rows = []
    for (model, probe), d in df.groupby(["model", "probe"], sort=False):
        null = model.startswith("uniform")
        try:
            dg = diagnose(d, model, probe)
        except SpatialBiasError as e:  # a significant null probe has no patching rows to decompose
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


def uniform_checks(run: Path, model: str = "uniform-s0", shuffles: int = 50, seed: int = 0) -> dict:
    """What the uniform organism's eval rows say beyond one probe: its cells pooled over every probe
    it was scored on (is there a small real effect?), and the paired test on its real answers with
    the cells shuffled within each item (the exact null: the test's false-positive rate there)."""
    import numpy as np

    from analyses.metrics import cell_metrics, item_matrix, paired_test
    res = pd.read_parquet(run / "results.parquet")
    u = res[(res.model == model) & (res.analysis == "eval") & (res.intervention == "baseline")]
    rng = np.random.default_rng(seed)
    frames, ps = [], []
    for cid, det in u.groupby("condition_id").details.first().items():
        d = pd.read_parquet(run / det)
        frames.append(d.assign(id=cid + ":" + d["id"].astype(str)))
        wide = item_matrix(d, 9)
        ps += [paired_test(np.array([rng.permutation(r) for r in wide]), rng, 200)[2] for _ in range(shuffles)]
    m = cell_metrics(pd.concat(frames, ignore_index=True), n_resamples=500)
    ps = np.asarray(ps, float)
    return {"probes": len(frames), "pooled_items": int(sum(len(f) for f in frames) // 9),
            "pooled_cell_accuracy": [round(x, 3) for x in m["cell_accuracy"]],
            "pooled_range_debiased": m["range_debiased"], "pooled_range_ci": m["range_ci"],
            "pooled_paired_p": m["paired_p"], "shuffled_probes": len(ps), "fpr_05": float((ps < 0.05).mean()),
            "fpr_01": float((ps < 0.01).mean())}


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
    ap.add_argument("--round", type=int, default=1, choices=(1, 2, 3))
    a = ap.parse_args(argv)
    from analyses import plan as planmod, runner
    if a.round == 3:
        folders = {n: copied(a.out, n, r, s, a.ckpt) for n, (r, s, _) in ROUND3.items()}
    else:
        folders = round2(a.out) if a.round == 2 else models(a.out, a.ckpt, a.skip_missing)
    cfg = mapping(folders)
    if a.round > 1:
        cfg["probes"] = {"main": cfg["probes"]["main"]}
    plan = planmod.from_mapping(cfg, Path.cwd(), a.out / "run", "blind campaign")
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
    if a.round == 1:
        atomic_write_text(a.out / "uniform.json", json.dumps(uniform_checks(a.out / "run"), indent=1))
    print(markdown(tab))


if __name__ == "__main__":
    main()

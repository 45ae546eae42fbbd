"""The one renderer (``spatialbias report --from DIR``, also the demo's report) on synthetic results
tables in the store's schema: page structure, embedded figures, escaping, determinism, bad input,
and a headless Chromium rendering when a Chromium is installed."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from analyses import figures as sf, report as sweep_report, store
from analyses.cli import app
from analyses.figures.common import grid_shape
from spatialbias.errors import SpatialBiasError

runner = CliRunner()

NASTY = 'tiny<script>alert("x")</script> & λ $a$'  # a model label that must be escaped everywhere
INTERVENTIONS = [  # (label, family, λ, interventions config)
    ("baseline", "baseline", np.nan, []),
    ("bapa", "bapa", np.nan, [{"kind": "bapa", "variant": "reference"}]),
    ("bapa:keep_hw", "bapa", np.nan, [{"kind": "bapa", "variant": "keep_hw"}]),
    ("agci:0.25", "agci", 0.25, [{"kind": "agci", "lam": 0.25}]),
    ("agci:0.5", "agci", 0.5, [{"kind": "agci", "lam": 0.5}]),
    ("agci:1", "agci", 1.0, [{"kind": "agci", "lam": 1.0}]),
    ("agci-pooled:0.5", "agci", 0.5, [{"kind": "agci", "lam": 0.5, "pooled": True}]),
    ("agci-adaptive:cos_spread:1", "agci-adaptive", 1.0, [{"kind": "agci_adaptive", "rule": "cos_spread",
                                                           "scale": 1.0}]),
    ("positions:shuffle", "positions", np.nan, [{"kind": "positions", "mode": "shuffle"}]),
]
VERSIONS = json.dumps({"torch": "2.13.0", "transformers": "4.99", "nnsight": "0.5", "python": "3.11",
                       "spatialbias": "0.1"}, sort_keys=True)


def _rows(model, probe, iv, analysis, seed, shape, rng):
    label, family, lam, ivs = iv
    config = json.dumps({"model": model, "probe": probe, "interventions": ivs, "analysis": analysis, "seed": seed,
                         "model_path": "", "probe_path": ""}, sort_keys=True)
    cid = hashlib.sha1(config.encode()).hexdigest()[:12]
    base = dict(condition_id=cid, model=model, probe=probe, intervention=label, family=family, analysis=analysis,
                seed=seed, config=config, versions=VERSIONS, details=None, model_fingerprint="f" * 16)
    base["lambda"] = lam
    out = []

    def add(metric, value, cell=None, layer=None, site=None, group=None, ci_low=np.nan, ci_high=np.nan):
        out.append(dict(base, metric=metric, cell=cell, layer=layer, site=site, group=group, value=float(value),
                        ci_low=ci_low, ci_high=ci_high))
    n = shape[0] * shape[1]
    bias = {"baseline": 0.3, "bapa": 0.05, "agci": 0.3 / (1 + (0 if np.isnan(lam) else lam)),
            "agci-adaptive": 0.12, "positions": 0.2}[family]
    if analysis == "eval":
        acc = np.clip(0.75 - bias / 2 + bias * np.arange(n) / (n - 1) + rng.normal(0, 0.02, n), 0, 1)
        for c in range(n):
            add("accuracy", acc[c], cell=c, ci_low=acc[c] - 0.05, ci_high=acc[c] + 0.05)
            add("p_correct", acc[c] * 0.9, cell=c)
            add("n", 100, cell=c)
        for metric, v in (("mean_accuracy", acc.mean()), ("mean_p_correct", 0.9 * acc.mean()),
                          ("range", np.ptp(acc)), ("std", acc.std()), ("cv", acc.std() / acc.mean()),
                          ("chi2", 40 * bias), ("chi2_p", 10 ** (-30 * bias)), ("consistency", 0.6),
                          ("n_rows", 100 * n)):
            add(metric, v)
        if shape != (3, 3):
            add("grid_rows", shape[0])
            add("grid_cols", shape[1])
    elif analysis == "patching":
        sites = ["lm.input", "lm.blocks.0", "lm.blocks.1"]
        for direction in ("denoise", "noise"):
            for s, site in enumerate(sites):
                for group in ("target", "image", "text", "last", "all"):
                    add(f"restoration_{direction}", rng.uniform(-0.1, 1.1), site=site, group=group)
        add("position_restoration", 0.9 - bias + rng.normal(0, 0.02))
        for layer in (0, 1):
            add("position_restoration", 0.5 - 0.3 * layer + rng.normal(0, 0.02), layer=layer)
        add("logit_diff_clean", 3.4 + rng.normal(0, 0.05))
        add("logit_diff_corrupt", 1.7 + rng.normal(0, 0.05))
        add("clean_cell", n - 1)
        add("corrupt_cell", 0)
    else:
        for layer in (0, 1):
            for c in range(n):
                add("attention_to_target", 0.06 + bias * 0.5 * c / (n - 1) + rng.normal(0, 0.005), cell=c,
                    layer=layer)
    return out


def synthetic_results(only_eval: bool = False, seeds=(0, 1)) -> pd.DataFrame:
    """A results table in the sweep's schema: two models, a 3×3 probe and a 2×4 probe, every kind
    of intervention, two seeds; patching and flow for one (model, probe) unless ``only_eval``."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        for iv in INTERVENTIONS:
            rows += _rows("organism", "shapes", iv, "eval", seed, (3, 3), rng)
        for iv in INTERVENTIONS[:2] + INTERVENTIONS[4:5] + INTERVENTIONS[7:8]:
            rows += _rows(NASTY, "shapes", iv, "eval", seed, (3, 3), rng)
        for iv in INTERVENTIONS[:2] + INTERVENTIONS[4:5]:
            rows += _rows("organism", "wide 2×4", iv, "eval", seed, (2, 4), rng)
            if not only_eval:
                for analysis in ("patching", "flow"):
                    rows += _rows("organism", "shapes", iv, analysis, seed, (3, 3), rng)
    df = pd.DataFrame(rows)
    for col in ("cell", "layer"):
        df[col] = df[col].astype("Int64")
    df["seed"] = df["seed"].astype("int64")
    df["lambda"] = df["lambda"].astype(float)
    for col in ("ci_low", "ci_high"):
        df[col] = df[col].astype(float)
    return df[store.COLUMNS]


def write_sweep(d: Path, df: pd.DataFrame) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / "results.parquet", index=False)
    (d / "plan.json").write_text(json.dumps({"models": ["organism"], "note": "a <b>bold</b> & λ claim"}, ensure_ascii=False),
                                 encoding="utf-8")
    confs = df.drop_duplicates("condition_id").config
    (d / "conditions.jsonl").write_text("".join(c + "\n" for c in confs), encoding="utf-8")
    return d


class Page(HTMLParser):
    """Collects ids, TOC links, images, headings and the page's text."""

    def __init__(self):
        super().__init__()
        self.ids, self.toc_links, self.imgs, self.h2, self.tags = set(), [], [], [], []
        self._nav = 0
        self._h2 = None
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "nav":
            self._nav += 1
        if tag == "a" and self._nav and a.get("href", "").startswith("#"):
            self.toc_links.append(a["href"][1:])
        if tag == "img":
            self.imgs.append(a)
        if tag == "h2":
            self._h2 = []

    def handle_endtag(self, tag):
        if tag == "nav":
            self._nav -= 1
        if tag == "h2" and self._h2 is not None:
            self.h2.append("".join(self._h2))
            self._h2 = None

    def handle_data(self, data):
        self.text.append(data)
        if self._h2 is not None:
            self._h2.append(data)


def parse(page: Path) -> Page:
    p = Page()
    p.feed(page.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The full synthetic sweep, reported once through the CLI."""
    d = write_sweep(tmp_path_factory.mktemp("sweep") / "run", synthetic_results())
    r = runner.invoke(app, ["report", "--from", str(d)])
    assert r.exit_code == 0, r.output
    assert str(d / "index.html") in r.output
    return d


def _no_rows() -> set[str]:
    import analyses.kinds  # noqa: F401  (registers them)
    from analyses.registry import analyses
    drawn = {"eval", "similarity", "occlusion", "patching", "knockout", "flow", "attribution"}
    return {s.anchor for a in analyses().values() if a.name not in drawn for s in a.sections}


NO_ROWS = _no_rows()
"""Sections of the registered analyses the synthetic sweeps here have no rows for (every analysis
added after these tests were written: lens, cellprobe, heads, …)."""


def test_page_structure(sweep):
    page = sweep / "index.html"
    p = parse(page)
    specs, skipped = sweep_report.plan_figures(pd.read_parquet(sweep / "results.parquet"), {})
    assert set(skipped) == {"probe-side", "knockout"} | NO_ROWS  # no similarity / occlusion / shift / knockout rows
    shown = [x.anchor for x in sweep_report.sections() if x.anchor not in skipped]
    assert p.h2 == [x.heading for x in sweep_report.sections() if x.anchor in shown]  # top-down: verdict first, no TOC heading
    assert p.h2[0] == "Verdict" and p.h2[-2:] == ["Numbers in detail", "Reproduce"]
    assert p.toc_links == shown and all(a in p.ids for a in p.toc_links)
    assert {s.section for s in specs} == set(shown) - {"details", "reproduce"}
    # verdict maps (baseline vs BaPA) of 3 (model, probe); 3 heatmaps; scatter; λ; denoise + noise; positions; attention
    assert len(specs) == len(p.imgs) == 3 + 3 + 1 + 1 + 2 + 1 + 1
    verdict = [s for s in specs if s.section == "verdict"]
    assert [s.kwargs["intervention"] for s in verdict] == [["baseline", "bapa"]] * 3
    text = (sweep / "index.html").read_text(encoding="utf-8")
    assert "Not in this run: Probe-side checks" in text and "Attention knockout (no rows" in text
    assert text.index("class='verdict'") < text.index("<img") < text.index("<details>")  # verdict, figure, tables
    for img in p.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1], validate=True)))
        im.verify()
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    for s in specs:
        for ext, magic in (("png", b"\x89PNG"), ("svg", b"<?xml")):
            f = sweep / "figures" / f"{s.stem}.{ext}"
            assert f.read_bytes().startswith(magic), f
    assert sorted(x.name for x in (sweep / "figures").iterdir()) == sorted(
        f"{s.stem}.{ext}" for s in specs for ext in ("png", "svg"))


def test_labels_escaped(sweep):
    text = (sweep / "index.html").read_text(encoding="utf-8")
    p = parse(sweep / "index.html")
    assert "<script" not in text and "<b>bold" not in text
    verdicts = (sweep / "index.html").read_text(encoding="utf-8").count("class='verdict'")
    assert "script" not in p.tags and p.tags.count("b") == len(p.imgs) + verdicts  # captions' and verdicts' own <b>
    assert html.escape(NASTY) in text
    body = "".join(p.text)
    assert NASTY in body and "agci:0.5" in body and "agci-adaptive:cos_spread:1" in body
    assert 'a <b>bold</b> & λ claim' in body


def test_every_command_redraws_its_figure(sweep):
    """The call printed under each figure is valid Python that returns that figure."""
    import matplotlib.pyplot as plt

    import analyses.figures  # noqa: F401  (the name the printed calls use)
    text = (sweep / "index.html").read_text(encoding="utf-8")
    found = __import__("re").findall(r"<figcaption><b>.*?</b> — <span class='caption'>(.*?)</span><br>Redraw: "
                                     r"<code>(.*?)</code>", text)
    calls = [html.unescape(c) for _, c in found]
    specs, _ = sweep_report.plan_figures(pd.read_parquet(sweep / "results.parquet"), {})
    assert calls == [s.command(sweep.resolve()) for s in specs]
    assert [html.unescape(c) for c, _ in found] == [s.caption for s in specs] and all(s.caption for s in specs)
    drawn = set()
    for call, spec in zip(calls, specs):
        assert call.startswith(f"analyses.figures.{spec.function}(pd.read_parquet(")
        if spec.function in drawn:  # the others differ only in their (checked) arguments; keeps the test fast
            continue
        drawn.add(spec.function)
        fig = eval(call, {"pd": pd, "analyses": analyses})
        assert isinstance(fig, plt.Figure) and fig.axes
        plt.close(fig)


def test_rerun_is_byte_identical(sweep):
    page = sweep / "index.html"
    before = page.read_bytes()
    svgs = {f.name: f.read_bytes() for f in (sweep / "figures").glob("*.svg")}
    (sweep / "figures" / "stale.png").write_bytes(b"old")
    assert sweep_report.build(sweep) == page
    assert page.read_bytes() == before
    assert {f.name: f.read_bytes() for f in (sweep / "figures").glob("*.svg")} == svgs
    assert not (sweep / "figures" / "stale.png").exists()


def test_conditions_table_aggregates_seeds(sweep):
    df = pd.read_parquet(sweep / "results.parquet")
    t = sf.conditions_table(df)
    assert len(t) == len(INTERVENTIONS) + 4 + 3 and (t.n_seeds == 2).all()
    row = t[(t.model == "organism") & (t.probe == "shapes") & (t.intervention == "bapa")].iloc[0]
    vals = df[(df.model == "organism") & (df.probe == "shapes") & (df.intervention == "bapa")
              & (df.metric == "range")].value
    assert row["range"] == pytest.approx(vals.mean()) and row["range_sd"] == pytest.approx(vals.std())
    assert list(t[(t.model == "organism") & (t.probe == "shapes")].intervention) == [  # family, then λ, then label
        "baseline", "bapa", "bapa:keep_hw", "agci:0.25", "agci:0.5", "agci-pooled:0.5", "agci:1",
        "agci-adaptive:cos_spread:1", "positions:shuffle"]
    page = (sweep / "index.html").read_text(encoding="utf-8")
    assert f"{row['range']:.3f} ± {row['range_sd']:.3f}" in page


def test_grid_shape_from_metrics():
    df = synthetic_results(only_eval=True, seeds=(0,))
    assert grid_shape(df, "wide 2×4") == (2, 4)
    assert grid_shape(df, "shapes", 9) == (3, 3)
    assert grid_shape(df, "other", 16) == (4, 4)
    fig = sf.cell_heatmaps(df, model="organism", probe="wide 2×4")
    assert fig.axes[0].collections[0].get_array().shape in ((8,), (2, 4))  # a 2×4 mesh
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_eval_only_sweep_skips_the_causal_sections(tmp_path):
    df = synthetic_results(only_eval=True, seeds=(0,))
    d = write_sweep(tmp_path / "ev", df[(df.model == "organism") & df.intervention.isin(["baseline", "agci:0.5"])])
    page = sweep_report.build(d)
    p = parse(page)
    assert p.h2 == ["Verdict", "Accuracy per grid cell", "Range vs mean accuracy", "AGCI: accuracy and range against λ",
                    "Numbers in detail", "Reproduce"] and all(a in p.ids for a in p.toc_links)
    text = page.read_text(encoding="utf-8")
    for anchor in ("patching", "position-patching", "attention-flow", "knockout", "probe-side"):
        assert f"<section id='{anchor}'>" not in text and f"href='#{anchor}'" not in text
    skipped = text.split("Not in this run: ")[1].split("</p>")[0]
    assert skipped.count("(no rows for it in this run") == 5 + len(NO_ROWS)
    assert "± " not in text.split("<summary>Conditions")[1].split("<table>")[1].split("</table>")[0]  # one seed
    assert len(p.imgs) == 2 + 2 + 1 + 1  # verdict maps (baseline only) and heatmaps of shapes and wide, scatter, λ


def test_figure_filters_and_errors():
    df = synthetic_results(seeds=(0,))
    with pytest.raises(SpatialBiasError, match="pass model="):
        sf.cell_heatmaps(df)  # two models: ambiguous
    with pytest.raises(SpatialBiasError, match="no patching rows"):
        sf.restoration_heatmaps(df, model="nope")
    with pytest.raises(SpatialBiasError, match="direction"):
        sf.restoration_heatmaps(df, model="organism", probe="shapes", direction="sideways")
    import matplotlib.pyplot as plt
    fig = sf.range_vs_accuracy(df, model="organism", probe="shapes", intervention=["baseline", "bapa"])
    assert len(fig.axes) == 1 and len(fig.axes[0].texts) == 2
    plt.close(fig)
    from analyses.figures.lambdas import adaptive_rule, agci_variant
    assert agci_variant("agci-pooled:0.5") == "agci-pooled" and agci_variant("agci:2") == "agci"
    assert adaptive_rule("agci-adaptive:cos_spread:0.5") == "agci-adaptive:cos_spread"
    assert adaptive_rule("agci-adaptive:cos_spread:0.5:pooled") == "agci-adaptive:cos_spread:pooled"


def test_plan_without_eval_skips_the_eval_sections():
    df = synthetic_results(seeds=(0,))
    specs, skipped = sweep_report.plan_figures(df[df.analysis != "eval"], {})
    assert set(skipped) == {"cell-accuracy", "range-accuracy", "agci-lambda", "probe-side", "knockout"} | NO_ROWS
    assert [s.function for s in specs] == ["restoration_heatmaps"] * 2 + ["position_restoration",
                                                                          "attention_to_target"]
    assert all("no " in why for why in skipped.values())


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_cli_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(runner.invoke(app, ["report", "--from", str(empty)]))
    assert str(empty) in line and "results.parquet" in line and "spatialbias sweep" in line
    line = one_line_error(runner.invoke(app, ["report", "--from", str(tmp_path / "missing")]))
    assert "no such file or folder" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.parquet").write_bytes(b"PAR1 this is not parquet at all")
    line = one_line_error(runner.invoke(app, ["report", "--from", str(bad)]))
    assert str(bad / "results.parquet") in line and "not a readable parquet" in line and "re-run" in line
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(wrong / "results.parquet")
    line = one_line_error(runner.invoke(app, ["report", "--from", str(wrong)]))
    assert "missing column(s) condition_id" in line
    assert not (bad / "index.html").exists() and not (wrong / "index.html").exists()


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


DISPLAY_WIDTH = 1150  # the report's body{max-width}: the width at which its figures are read


def screenshot(page: Path, shot: Path, profile: Path, width: int = DISPLAY_WIDTH, height: int = 2000) -> np.ndarray:
    """A headless-Chromium screenshot of ``page`` in a ``width`` × ``height`` window, as grey levels."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
           f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        im.verify()
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (width, height)
        return np.asarray(im.convert("L"), float)


FIRST_SCREEN = (1280, 900)
"""A laptop's browser window: what a reader sees before scrolling."""
LAYOUT_PROBE = """<script>window.addEventListener('load', () => {
  const box = e => e ? e.getBoundingClientRect() : null, v = box(document.querySelector('.verdict')),
        img = document.querySelector('#verdict figure img'), f = box(img);
  document.body.setAttribute('data-layout', JSON.stringify({verdict: v && [v.top, v.bottom],
    figure: f && [f.top, f.bottom], loaded: !!img && img.complete && img.naturalHeight > 0}));
});</script>"""


def layout(page: Path, tmp: Path, size: tuple[int, int] = FIRST_SCREEN) -> dict:
    """Where the first verdict box and the verdict's first figure lie in a ``size`` window (CSS
    pixels from the top), measured by headless Chromium on a copy of the page with a probe script."""
    import re
    probe = tmp / "layout.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", LAYOUT_PROBE + "</body>"), encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={tmp / 'profile-layout'}", f"--window-size={size[0]},{size[1]}",
           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'data-layout="([^"]*)"', r.stdout)
    assert r.returncode == 0 and m, r.stderr[-2000:]
    return json.loads(html.unescape(m.group(1)))


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (chromium / chromium-browser) installed: the HTML "
                    "structure tests still run; .ci/run installs it where apt works")
def test_first_screen_shows_the_verdict_and_a_figure(sweep, tmp_path):
    """At 1280 × 900 the reader sees, without scrolling, the first run's verdict box whole and the
    verdict's per-cell map (baseline vs BaPA) whole, drawn."""
    pos = layout(sweep / "index.html", tmp_path)
    assert pos["loaded"], pos
    assert 0 < pos["verdict"][0] < pos["verdict"][1] <= pos["figure"][0] < pos["figure"][1] <= FIRST_SCREEN[1], pos
    shot = screenshot(sweep / "index.html", tmp_path / "first.png", tmp_path / "profile", *FIRST_SCREEN)
    top, bottom = int(pos["figure"][0]), int(pos["figure"][1])
    assert (shot[top:bottom] < 200).mean() > 0.1  # the heatmap's coloured squares are on the screen


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (chromium / chromium-browser) installed: the HTML "
                    "structure tests still run; .ci/run installs it where apt works")
def test_renders_in_headless_chromium(sweep, tmp_path):
    """The page at its display width (a 1150 px window): drawn, and every figure's PNG fits it, so
    the browser shows it unshrunk (the size the figures' text sizes are checked at)."""
    a = screenshot(sweep / "index.html", tmp_path / "shot.png", tmp_path / "profile")
    assert a.var() > 0
    assert (a < 250).mean() > 0.02  # text, the table of contents and the first figures are drawn
    p = parse(sweep / "index.html")
    for img in p.imgs:
        im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert im.size[0] <= DISPLAY_WIDTH, (img["alt"], im.size)
    # a figure scrolled into view is drawn too: the page is long; shoot its full height at 1150
    tall = screenshot(sweep / "index.html", tmp_path / "tall.png", tmp_path / "profile2", height=12000)
    assert (tall[6000:] < 250).mean() > 0.02

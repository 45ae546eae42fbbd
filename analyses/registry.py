"""An analysis is one registered object, as an intervention is.

Role: the one place the plan, the runner, the dry run and memory model, the summary, the report
and the ``causal`` command learn which analyses exist and what each needs. May import:
``spatialbias``. The analyses themselves live one module each in :mod:`analyses.kinds` and
register when that package is imported (by the plan, the dry run, the summary and the report).

Adding an analysis = one module in ``analyses/kinds/`` (its :class:`Analysis`: how it runs, its
options, cost, memory profile, summary block, claims, report section and figures) plus its
figure family in ``analyses/figures/``, listed in ``analyses/kinds/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from spatialbias.errors import SpatialBiasError

PROFILES = ("forward", "flow", "patching", "attribution")
"""The memory model's profiles (:func:`analyses.memory_model.activation_peak`): what one step keeps."""


@dataclass(frozen=True)
class Section:
    """A report section: its anchor, heading and one-line blurb (None: no blurb)."""
    anchor: str
    heading: str
    blurb: str | None = None


@dataclass
class FigureSpec:
    """One figure: ``analyses.figures.<function>(table, **kwargs)``, where ``table`` is the
    results table or, with ``details``, that analysis' detail table; saved as ``stem`` and shown
    in report section ``section``. ``caption``: what to read from it, printed under it (the report
    fills it from :func:`analyses.figures.caption`)."""
    section: str
    stem: str
    function: str
    kwargs: dict = field(default_factory=dict)
    title: str = ""
    details: str | None = None
    caption: str = ""

    def command(self, src) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        table = (f"pd.read_parquet({str(src / 'tables' / (self.details + '.parquet'))!r})" if self.details
                 else f"pd.read_parquet({str(src / 'results.parquet')!r})")
        return f"analyses.figures.{self.function}({table}{args})"

    def draw(self, df, tables: dict):
        from analyses import figures
        return getattr(figures, self.function)(tables[self.details] if self.details else df, **self.kwargs)


@dataclass(frozen=True)
class Analysis:
    """One analysis.

    * ``run(lvlm, cond, ctx) -> (rows, details)``: tidy metric rows and a per-row / per-item table;
    * ``options``: option → default (``None``: the sweep-wide ``causal_items`` / ``patch_cells``);
      ``check(opts, where) -> opts`` validates them (one error line naming ``where``);
    * ``cost(cond, probe_rows, items, lm_layers) -> int``: rows pushed through the model (dry run);
    * ``profile(options) -> str``: the memory profile (:data:`PROFILES`) of its largest step,
      which chooses its rows per step under ``--max-memory`` and prices it in ``--dry-run``;
    * ``baseline_only``: runs on the baseline unless ``[analysis.NAME] interventions`` says more;
    * ``causal``: one of the analyses between two cells that ``spatialbias causal`` runs, with at
      most ``items_cap`` items there (flow reads every placement of an item);
    * ``summary(rows, order) -> {key: block}``: its blocks of summary.json's ``causal`` (rows: this
      analysis' rows of one model × probe; order: the interventions in display order);
    * ``claims(run) -> [(claim, intervention, {value, ci_low, ci_high})]``: its rows of the
      report's findings table, from the run's summary;
    * ``figures(df, tables) -> [FigureSpec]`` and ``sections``: its report sections and figures.
    """
    name: str
    run: Callable[..., tuple]
    cost: Callable[..., int]
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[dict, str], dict] | None = None
    profile: Callable[[dict], str] = lambda opts: "forward"
    baseline_only: bool = False
    causal: bool = False
    items_cap: int | None = None
    summary: Callable[..., dict] | None = None
    claims: Callable[[dict], list] | None = None
    figures: Callable[..., list] | None = None
    sections: tuple[Section, ...] = ()


_REGISTRY: dict[str, Analysis] = {}


def register(a: Analysis) -> Analysis:
    """Add an analysis (its module calls this on import); a second one of the same name is refused."""
    if a.name in _REGISTRY and _REGISTRY[a.name] is not a:
        raise SpatialBiasError(f"analysis {a.name!r} is registered twice; give the new one another name")
    _REGISTRY[a.name] = a
    return a


def analyses() -> dict[str, Analysis]:
    """Every registered analysis by name, in the order :mod:`analyses.kinds` lists them (importing
    that package registers them; the plan, the runner, the dry run, the summary and the report
    import it, so this module imports none of them)."""
    if not _REGISTRY:
        raise SpatialBiasError("no analysis is registered: import analyses.kinds first")
    return dict(_REGISTRY)


def get(name: str) -> Analysis:
    """The analysis ``name``; one error line listing the known ones otherwise."""
    known = analyses()
    if name not in known:
        raise SpatialBiasError(f"unknown analysis {name!r}; use {', '.join(known)}")
    return known[name]




# ------------------------------------------------------------------------------------------------
# helpers the analyses' figure plans share


def having(df, analysis: str, metric, **notna):
    """Rows of ``analysis`` whose metric is ``metric`` (a name or a list) and whose columns named
    in ``notna`` are set (e.g. ``cell=1``: per-cell rows)."""
    d = df[(df.analysis == analysis) & df.metric.isin([metric] if isinstance(metric, str) else metric)]
    for col in notna:
        d = d[d[col].notna()]
    return d


def model_probes(d) -> list[tuple[str, str]]:
    """The (model, probe) pairs of a table, sorted."""
    return sorted(set(zip(d.model, d.probe)))


def stem(prefix: str, *labels) -> str:
    """A file-name-safe figure stem from labels, made unique by a short hash of the exact labels."""
    import hashlib
    import re
    text = "_".join(re.sub(r"[^a-z0-9]+", "-", str(x).lower()).strip("-")[:24] for x in labels)
    return f"{prefix}{text}_{hashlib.sha1(repr(labels).encode()).hexdigest()[:6]}"

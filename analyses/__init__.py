"""analyses: plans of conditions, the runner and its store, tables, figures and reports.

Layers: ``probes`` (data) → ``interp`` (models, interventions, causal engine) → ``analyses``
(this package) → the command line (:mod:`analyses.cli`). From Python: :func:`run`, :func:`demo`
and :class:`Results` (:mod:`analyses.results`); figures: :mod:`analyses.figures`.
"""
from analyses.results import Results, demo, run

__all__ = ["Results", "demo", "run"]

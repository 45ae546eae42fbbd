"""Every figure of the toolkit: one public function of a results table (or of its detail
tables), drawn once, in one module per family — accuracy maps (:mod:`.accuracy`), λ curves
(:mod:`.lambdas`), patching (:mod:`.patching`), the causal graph (:mod:`.graph`), attention flow (:mod:`.flow`), the logit lens
(:mod:`.lens`), cell-identity probes (:mod:`.cellprobe`), attention heads (:mod:`.heads`), cell pairs (:mod:`.pairs`). Each returns a
matplotlib Figure (shown inline in a notebook); :func:`save` writes PNG + SVG. The first paragraph of
each figure's docstring says what to read from it (:func:`caption`; the report prints it under the
figure). Sizes, colour scales and the 0–1 anchoring of accuracies: :mod:`analyses.figures.common`.

>>> import pandas as pd
>>> from analyses import figures
>>> df = pd.read_parquet("out/demo/results.parquet")
>>> figures.cell_heatmaps(df, model="organism", probe="shapes")
"""
import inspect as _inspect
import sys as _sys

from analyses.figures.accuracy import (cell_heatmaps, conditions_table, occlusion_maps, range_vs_accuracy,
                                       shift_curves, similarity_maps)
from analyses.figures.cellprobe import cellprobe_accuracy
from analyses.figures.common import save, select
from analyses.figures.flow import attention_to_target, layer_cell
from analyses.figures.graph import causal_graph
from analyses.figures.heads import head_shares
from analyses.figures.lambdas import lambda_curves
from analyses.figures.lens import lens_margins
from analyses.figures.pairs import pair_components
from analyses.figures.patching import knockout_drops, position_restoration, restoration_heatmaps
from analyses.figures.zoo import zoo_diagnosis

__all__ = ["attention_to_target", "causal_graph", "cell_heatmaps", "cellprobe_accuracy", "conditions_table",
           "head_shares", "knockout_drops", "lambda_curves", "layer_cell", "lens_margins", "occlusion_maps",
           "pair_components", "position_restoration", "range_vs_accuracy", "restoration_heatmaps", "save", "select",
           "shift_curves", "similarity_maps", "zoo_diagnosis"]


def caption(function) -> str:
    """What to read from a figure: the first paragraph of its function's docstring, on one line
    (the report prints it under the figure). ``function``: a figure function or its name."""
    if isinstance(function, str):
        function = getattr(_sys.modules[__name__], function)
    doc = _inspect.cleandoc(function.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())

"""The registered analyses, one module each (:mod:`analyses.registry`). Importing this package
registers them; their order here is their order in plans, summaries and the report."""
from analyses.kinds import eval, similarity, occlusion, patching, pairs, knockout, flow, attribution, heads, lens, cellprobe  # noqa: F401
from analyses.kinds import routing  # noqa: F401  (MoE LMs: expert routing per cell)

"""The zoo: where the toolkit places each organism's bias, against where it was planted.

Role: the figure of ``spatialbias zoo`` (a function of its table, ``zoo.parquet``). May import:
``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import MAX_WIDTH_IN, _suptitle, styled

_LIM = (-0.4, 1.4)


@styled
def zoo_diagnosis(tab: pd.DataFrame):
    """Each point is one organism × seed with a significant bias: how much of the clean − corrupt
    gap the target's clean position ids restore (x) against how much its clean image content,
    moved into the bad cell's slots, restores (y), with 95% intervals. Right-bottom: the LM's
    position ids; left-top: before the LM; left-bottom: neither (the LM's token order). Filled:
    the diagnosis matches the construction; a cross: it does not. Organisms without a
    significant bias are listed under the plot, not drawn.

    ``tab``: the zoo table (columns organism, seed, position[_lo, _hi], vision[_lo, _hi],
    diagnosis, matches); values beyond −0.4…1.4 are drawn at the edge."""
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, 6.4), 4.6))
    shown = tab[tab.diagnosis != "no significant spatial bias"]
    names = list(dict.fromkeys(tab.organism))
    colours = dict(zip(names, (plt.get_cmap("tab10")(i % 10) for i in range(len(names)))))
    ax.axvspan(0.5, _LIM[1], ymin=0, ymax=(0.5 - _LIM[0]) / (_LIM[1] - _LIM[0]), color="#dbe9f6", zorder=0)
    ax.axhspan(0.5, _LIM[1], xmin=0, xmax=(0.5 - _LIM[0]) / (_LIM[1] - _LIM[0]), color="#f6e3db", zorder=0)
    for x in (0.5,):
        ax.axvline(x, color="grey", lw=0.6, ls="--")
        ax.axhline(x, color="grey", lw=0.6, ls="--")
    clip = lambda v: np.clip(np.asarray(v, float), *_LIM)  # noqa: E731
    seen = set()
    for r in shown.itertuples():
        x, y = clip(r.position), clip(r.vision)
        xe = np.abs(np.array([[clip(r.position_lo)], [clip(r.position_hi)]]) - x)
        ye = np.abs(np.array([[clip(r.vision_lo)], [clip(r.vision_hi)]]) - y)
        c = colours[r.organism]
        label = r.organism if r.organism not in seen else None
        seen.add(r.organism)
        ax.errorbar(x, y, xerr=np.nan_to_num(xe), yerr=np.nan_to_num(ye), fmt="o" if r.matches != "no" else "x",
                    color=c, ms=6, lw=0.8, capsize=2, label=label)
    ax.set_xlim(*_LIM)
    ax.set_ylim(*_LIM)
    ax.set_xlabel("position-id restoration (share of the gap)")
    ax.set_ylabel("vision-side restoration (moved content)")
    ax.text(1.35, -0.35, "LM position ids", ha="right", va="bottom", fontsize=8)
    ax.text(-0.35, 1.35, "before the LM", ha="left", va="top", fontsize=8)
    ax.text(-0.35, -0.35, "neither: LM order", ha="left", va="bottom", fontsize=8)
    if seen:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, title="organism")
    none = tab[tab.diagnosis == "no significant spatial bias"]
    if len(none):
        txt = ", ".join(f"{o} ({', '.join(str(s) for s in g.seed)})" for o, g in none.groupby("organism", sort=False))
        ax.set_title(f"no significant bias (seeds): {txt}", fontsize=8, wrap=True)
    n_match = int((tab.matches == "yes").sum())
    scored = int(tab.matches.isin(["yes", "no"]).sum())
    _suptitle(fig, f"organism zoo: diagnosis matches the construction in {n_match} of {scored} scored runs")
    return fig

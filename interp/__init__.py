"""interp: load an LVLM, run it with interventions at canonical sites.

>>> import interp
>>> m = interp.load("organism")
>>> logits = m.run(inputs, interventions=[interp.BaPA()])
"""
from spatialbias.errors import SpatialBiasError
from interp.interventions import (AGCI, AdaptiveAGCI, BaPA, Intervention, Knockout, PositionPermute, agci_inject,
                                  bapa_position_ids, from_dict)
from interp.load import load
from interp.model import LVLM

__all__ = ["AGCI", "AdaptiveAGCI", "BaPA", "PositionPermute", "Intervention", "Knockout", "LVLM", "SpatialBiasError", "agci_inject", "bapa_position_ids",
           "from_dict", "load"]

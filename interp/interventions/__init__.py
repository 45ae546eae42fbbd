"""Interventions as small serialisable configs (a sweep is a table of these).

* :class:`BaPA` — all image tokens share one position id (:mod:`.bapa`).
* :class:`AGCI`, :class:`AdaptiveAGCI` — global image context injected into every image token
  (:mod:`.agci`).
* :class:`PositionSwap`, :class:`PositionPermute` — position-id patching and controls (:mod:`.controls`).
* :class:`VisionPositionSwap` — the vision tower's position code of two cells swapped (:mod:`.vision_positions`).
* :class:`Knockout` — attention from the query rows to chosen cells blocked (:mod:`.knockout`).
* :class:`Intervention`, :func:`register`, :func:`from_dict` — the base and its registry (:mod:`.base`).
"""
from interp.interventions.agci import ADAPTIVE_RULES, AGCI, AdaptiveAGCI, adaptive_lambda, agci_inject
from interp.interventions.bapa import BAPA_VARIANTS, BaPA, bapa_position_ids
from interp.interventions.base import KINDS, Edit, Intervention, from_dict, register
from interp.interventions.controls import POSITION_CONTROLS, PositionPermute, PositionSwap
from interp.interventions.knockout import Knockout
from interp.interventions.vision_positions import VisionPositionSwap

__all__ = ["ADAPTIVE_RULES", "AGCI", "AdaptiveAGCI", "BAPA_VARIANTS", "BaPA", "Edit", "Intervention", "KINDS",
           "Knockout", "POSITION_CONTROLS", "PositionPermute", "PositionSwap", "VisionPositionSwap", "adaptive_lambda",
           "agci_inject", "bapa_position_ids", "from_dict", "register"]

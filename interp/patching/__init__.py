"""Activation patching between two placements of the same items, batched.

``base`` and ``source`` are processor inputs with one row per item (row i of both = item i in
two placements, same prompt). A :class:`Patch` names a site and a token group; the patched run
is the base row with the source row's activation written at that site and group. All patches
run in forwards of at most ``batch_size`` rows: each item (or slice of its patches) contributes
its source row, its unpatched base row and one base row per patch, and every edit copies from
that source row inside the same forward (the source row is never edited, so it holds the source
activations).

Denoising (clean → corrupt): base = corrupt, source = clean; restoration
``(patched − corrupt) / (clean − corrupt)``. Noising (corrupt → clean): base = clean, source =
corrupt; restoration ``(clean − patched) / (clean − corrupt)`` (the share of the gap the
corrupt activation alone creates). Means over items are taken before the ratio.

Modules: :mod:`.core` (patches, token groups, metric, restoration), :mod:`.activation`
(:func:`run_patches` and the full-forward scheme), :mod:`.resumed` (the resumed scheme),
:mod:`.moved` (the vision-side restoration, :func:`run_moved`).
"""
from interp.patching.activation import run_patches
from interp.patching.core import GROUPS, Patch, default_patches, group_masks, logit_diff, restoration, site_groups
from interp.patching.moved import cell_keys, moved_slots, run_moved

__all__ = ["GROUPS", "Patch", "cell_keys", "default_patches", "group_masks", "logit_diff", "moved_slots",
           "restoration", "run_moved", "run_patches", "site_groups"]

"""The toolkit's one error type for bad input.

Every user-facing failure (a missing image, a malformed probe row, an unsupported model,
a prompt without the image token, λ out of range) raises :class:`SpatialBiasError` whose
message is one line naming the input and the fix. The CLI prints that line and exits 2;
notebooks see an ordinary exception with the same text.
"""
from __future__ import annotations


class SpatialBiasError(ValueError):
    """Bad input. ``str(err)`` is one line: what is wrong, where, and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

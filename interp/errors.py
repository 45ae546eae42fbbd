"""The toolkit's error type (defined in :mod:`spatialbias.errors`, below every layer)."""
from spatialbias.errors import SpatialBiasError

__all__ = ["SpatialBiasError"]

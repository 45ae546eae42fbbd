"""What every layer of the toolkit shares, and nothing else: the error type for bad input and
atomic file writes. ``probes`` (data), ``interp`` (models) and ``analyses`` (runs, tables,
figures, reports) all import from here; this package imports none of them (and no torch)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spatialbias")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

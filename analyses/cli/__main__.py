"""``python -m analyses.cli``: the ``spatialbias`` command."""
import sys

from analyses.cli import main

sys.exit(main())

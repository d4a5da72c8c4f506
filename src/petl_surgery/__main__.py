"""``python -m petl_surgery ...``: the same command line as ``petl-surgery ...``."""

import sys

from .cli import main

sys.exit(main())

"""`python -m FSEFTSegmentLib` is the `fseft` command (what the Slicer module runs)."""

import sys

from .cli import main

sys.exit(main())

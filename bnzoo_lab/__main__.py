"""``python -m bnzoo_lab ...`` is ``bnzoo experiment ...``."""

import sys

from bnzoo_lab import main

sys.exit(main())

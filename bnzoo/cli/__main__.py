"""``python -m bnzoo.cli ...`` is ``bnzoo ...``."""

import sys

from .main import main

sys.exit(main())

"""``python -m bnzoo.experiments ...`` is ``bnzoo experiment ...``."""

import sys

from bnzoo.experiments import main

sys.exit(main())

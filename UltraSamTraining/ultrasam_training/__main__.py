"""``python -m ultrasam_training ...``: see :mod:`ultrasam_training.cli`."""

import sys

from ultrasam_training.cli import main

sys.exit(main())

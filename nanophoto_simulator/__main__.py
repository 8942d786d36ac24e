"""``python -m nanophoto_simulator``: the simulator's command line (``cli.py``)."""

import sys

from nanophoto_simulator.cli import main

sys.exit(main())

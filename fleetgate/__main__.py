"""``python -m fleetgate`` runs the command line."""

import sys

from fleetgate.cli import main

sys.exit(main())

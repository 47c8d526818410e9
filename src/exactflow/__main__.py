"""``python -m exactflow`` runs the command line (see :mod:`exactflow.cli`)."""

import sys

from .cli import main

sys.exit(main())

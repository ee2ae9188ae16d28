"""``python -m builder`` runs the lbuild CLI."""

import sys

from builder.cli import main

sys.exit(main())

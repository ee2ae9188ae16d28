"""``python -m builder`` runs the lbuild CLI."""

from builder.cli import run

run()

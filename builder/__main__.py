"""``python -m builder`` runs the lbuild CLI."""

from builder.entry import main

main()

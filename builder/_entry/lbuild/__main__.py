"""``python -m lbuild`` runs the lbuild command line (the same entry as the ``lbuild`` script)."""

from builder.entry import main

main()

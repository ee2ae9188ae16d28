"""The ``lbuild`` command line's first code: hand the command to an ``lbuild daemon`` that
serves this code (``builder.daemon``, through ``builder.daemon_client``), else run it in this process (``builder.cli``).

``python -m builder``, ``python -m lbuild`` and the ``lbuild`` script all start here.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``lbuild`` command line: in the daemon when one serves it, else here."""
    from builder.daemon_client import delegate, exit_now

    code = delegate(sys.argv[1:])
    if code is None:
        from builder.cli import run

        run()
        return
    exit_now(code)

"""``python -m lbuild``: the installed module name of the lbuild command.

The code lives in the ``builder`` and ``cache`` packages; this package exists only so that
``python -m lbuild`` works as ``lbuild`` does.  pyproject.toml installs this directory as the
top-level package ``lbuild`` (setuptools ``packages.find`` over ``builder/_entry``), which keeps
the repository's top level free of a module of its own.
"""

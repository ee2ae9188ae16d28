"""Solving: the DAG is executed in topological order; a step key that hits is reused, a miss
is executed (COPY/ADD layers, RUN in its sandbox) and recorded through the step cache.
"""

"""Planning: stages -> the DAG of steps, the context sources they select, and their step keys.
Pure functions of their inputs; nothing here reads or writes the cache index.
"""

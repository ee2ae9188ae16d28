"""The cache index: step records, layer records, tags, stat rows. SQLAlchemy models and
writes (db, models, records, the writer child), the stdlib read path, the stat index.
"""

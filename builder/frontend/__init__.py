"""The front end: Dockerfile bytes -> typed, frozen instructions and stages (parser, ARG/ENV
expansion, shell words, .dockerignore). Imports neither plan nor solve.
"""

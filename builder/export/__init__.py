"""Export: a solved image -> OCI image layout, docker-archive tar (and registry push).
"""

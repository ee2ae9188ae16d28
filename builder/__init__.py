"""lbuild's builder: Dockerfile -> plan -> solve -> export, the executor, watch and the CLI."""

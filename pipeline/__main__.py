"""`python -m pipeline` is `ckpt-surgery`."""
from pipeline.cli import command

command()

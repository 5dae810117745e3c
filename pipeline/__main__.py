"""`python -m pipeline` is `ckpt-surgery`."""
from pipeline.supervisor import command

command()

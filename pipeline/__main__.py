"""`python -m pipeline` is `ckpt-surgery`."""
import sys

from pipeline.cli import main

sys.exit(main())

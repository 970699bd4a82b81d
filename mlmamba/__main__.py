"""`python -m mlmamba ...`: see mlmamba/cli.py."""
import sys

from .cli import main

sys.exit(main())

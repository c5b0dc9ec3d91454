"""`python -m tokendrop ...` runs the `tokendrop` command."""

import sys

from .cli import main

sys.exit(main())

"""`python -m ddpmkit.cli`: the `ddpm` command."""

import sys

from ddpmkit.cli import main

sys.exit(main())

"""`python -m nflux ...`: the nflux command line (see `nflux.cli`)."""

import sys

from nflux.cli import main

sys.exit(main())

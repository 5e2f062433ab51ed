"""`python -m persd_online` is the `persd-online` command."""

import sys

from persd_online.cli import main

sys.exit(main())

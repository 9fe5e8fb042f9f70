"""`python -m sfp` runs the command line."""

from sfp.cli import main

raise SystemExit(main())

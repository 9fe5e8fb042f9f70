"""`python -m sfp` runs the command line."""

from sfp.cli.app import main

raise SystemExit(main())

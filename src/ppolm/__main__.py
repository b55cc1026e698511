"""``python -m ppolm``: the command line."""

from ppolm.cli import main

raise SystemExit(main())

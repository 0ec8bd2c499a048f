"""`python -m onboard ...` = `eoedge onboard ...`."""
import sys

from onboard.cli import main

raise SystemExit(main(sys.argv[1:]))

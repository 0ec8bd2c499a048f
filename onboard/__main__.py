"""`python -m onboard ...` = `eoedge onboard ...`."""
import sys

from onboard.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The `eoedge` command: a thin dispatcher over the four packages' own CLIs."""

from eoedge.cli import main

raise SystemExit(main())

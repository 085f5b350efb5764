from weightdiff.cli import main

raise SystemExit(main())

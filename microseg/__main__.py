from microseg.cli import main

raise SystemExit(main())

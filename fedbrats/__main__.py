from fedbrats.cli import main

raise SystemExit(main())

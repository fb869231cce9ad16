from relay.run.cli import main

raise SystemExit(main())

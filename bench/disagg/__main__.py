from bench.disagg.run import main

raise SystemExit(main())

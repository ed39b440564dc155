from genkit.cli import main

raise SystemExit(main())

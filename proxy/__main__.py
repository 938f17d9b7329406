"""`python -m proxy` is the `realtime-reset-proxy` command."""

from proxy.cli import main

raise SystemExit(main())

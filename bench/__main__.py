"""`python -m bench`: the whole benchmark (see bench/README.md)."""

from bench.cli import main

raise SystemExit(main())

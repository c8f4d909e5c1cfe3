"""`python -m bench` (also what `torchrun -m bench` starts)."""

from .cli import main

raise SystemExit(main())

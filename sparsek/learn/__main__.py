"""``python -m sparsek.learn --case learn-cpu --json out.json``: see sparsek.learn.train."""

from .train import main

raise SystemExit(main())

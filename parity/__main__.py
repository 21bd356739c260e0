"""``python -m parity``; see :mod:`parity.cli`."""

from parity.cli import main

raise SystemExit(main())

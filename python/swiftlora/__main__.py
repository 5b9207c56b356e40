"""``python -m swiftlora ...`` runs the ``swiftlora`` command."""
from .cli import main

raise SystemExit(main())

"""``python -m fcgi_manager`` is the same as the ``fcgi-manager`` command."""

from .cli import main

raise SystemExit(main())

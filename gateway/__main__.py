"""``python -m gateway``: the same as the ``glm-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())

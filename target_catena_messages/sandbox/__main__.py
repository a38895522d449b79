"""``python -m target_catena_messages.sandbox``: the same as the ``catena-sandbox`` command."""

from __future__ import annotations

from target_catena_messages.sandbox.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

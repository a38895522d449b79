"""``python -m target_catena_messages`` runs the target CLI."""

from target_catena_messages.singer.target import TargetCatenaMessages

TargetCatenaMessages.cli()

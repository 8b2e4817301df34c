"""CLI commands of this package (registered by stage4.cli)."""

COMMANDS: list = []

"""CLI commands of the installer-driven (Packer) builder (registered by stage4.cli)."""

COMMANDS: list = []

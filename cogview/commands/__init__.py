"""Subcommands of the `cogview` command, one module per area; each module lists its parser builders in COMMANDS."""

"""The factory's commands: argument adders (ground.commands.args, torch-free so that `--help` is
fast), and per stage the `cmd_*` handler with its human text."""

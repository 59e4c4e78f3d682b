"""``python -m comneck_cli``: the same as the ``comneck`` command."""

from comneck_cli.cli import main

main(prog_name="comneck")

"""The ``comneck`` command line: the ``main`` group and its command modules, one per command group.

The commands only parse options and print; the work is the library's. Importing this package must not import
torch (``comneck --help`` and ``comneck info`` stay fast): each command imports heavy modules when it runs.
"""

from __future__ import annotations

import click

from comneck_cli.cli.batch_commands import batch
from comneck_cli.cli.codecs_commands import codecs_command, complexity
from comneck_cli.cli.coding_commands import decode, encode, info
from comneck_cli.cli.eval_commands import eval_command
from comneck_cli.cli.features_commands import features
from comneck_cli.cli.mllm_commands import ask
from comneck_cli.cli.plumbing import flag
from comneck_cli.cli.serve_commands import serve
from comneck_cli.cli.train_commands import train
from comneck_cli.cli.weights_commands import weights_group

__all__ = ["main", "flag"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="comneck")
def main() -> None:
    """Compress images for multimodal LLMs: learned codecs, .cnk files, CLIP features from latents."""


for command in (encode, decode, features, info, complexity, codecs_command, weights_group, train, eval_command,
                batch, ask):
    main.add_command(command)
main.add_command(serve)


if __name__ == "__main__":  # pragma: no cover
    main()

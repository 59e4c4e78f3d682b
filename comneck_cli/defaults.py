"""What a fresh install uses when nothing is named (torch-free, so the CLI can show it in --help)."""

# The variable-rate codec shipped in weights/ (see weights/mbt2018-mean-vbr.md): `comneck encode photo.png`
# works offline with it; -q q is its rate q, --rate any point between.
DEFAULT_CODEC = "mbt2018-mean-vbr"

"""What a fresh install uses when nothing is named (torch-free, so the CLI can show it in --help)."""

# Shipped in weights/ (issue #10; model card weights/mbt2018-mean-vbr.md): one variable-rate file covers every -q,
# so `comneck encode photo.png` works offline. The zoo codecs stay one --codec away.
DEFAULT_CODEC = "mbt2018-mean-vbr"

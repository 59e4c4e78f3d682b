"""What a fresh install uses when nothing is named (torch-free, so the CLI can show it in --help)."""

# CompressAI's zoo has weights for it (downloaded once, sha256-recorded). Issue #10 replaces it with the
# variable-rate codec trained by this project once that codec beats JPEG and ships in weights/.
DEFAULT_CODEC = "mbt2018-mean"

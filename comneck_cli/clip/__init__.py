"""CLIP: the open_clip tower and its split into C and C' (:mod:`.tower`), MLLM presets (:mod:`.presets`).

Torch-free on import: the CLI reads the presets without loading a model."""

"""``comneck features`` as a library function: files in, features files out, through
:class:`comneck_cli.features.FeatureRunner`, the one feature path ``comneck batch features`` (``FeaturesJob``)
runs too. Importing this module does not import torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from comneck_cli.errors import ComneckError
from comneck_cli.io.outputs import Report, is_dir_target, refuse_input, without_clashes

if TYPE_CHECKING:
    from comneck_cli.formats import Limits
    from comneck_cli.features import FeatureRunner


def extract_features(inputs: Sequence[str], output: str, runner: FeatureRunner, report: Report, *, fmt: str = "pt",
                     force: bool = False, batch_size: int = 8, limits: Limits | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> None:
    """Features of ``.cnk`` files (images for ``via`` uncompressed; ``-``: stdin) into the file ``output`` (every
    input stacked along dim 0; .pt, .safetensors or .npy) or, when it is a folder, one ``STEM.fmt`` per input.
    Up to ``batch_size`` inputs share a forward pass; an input that fails is reported and the others go on."""
    from comneck_cli.coding.files import read_inputs, stepper
    from comneck_cli.features import save_features

    to_dir = is_dir_target(output)
    if not to_dir:
        refuse_input(Path(output), inputs)  # before anything is read or loaded
    items = read_inputs(inputs, report, images=runner.via == "uncompressed", limits=limits)
    if to_dir:
        items = without_clashes(items, lambda item: (item[0], [Path(output) / f"{item[1]}.{fmt}"]), report,
                                inputs=inputs)
    advance = stepper(on_progress, len(items))
    resolved = []  # (position, item, Resolved): every model an input needs, found before any compute
    for position, item in enumerate(items):
        try:
            resolved.append((position, item, runner.resolve(item[3])))
        except ComneckError as exc:
            report.fail(item[0], exc)
            advance()
    if not to_dir:
        check_one_shape([(item[0], runner.feature_shape(found, item[3])) for _, item, found in resolved])
    results: list = []  # (position, label, stem, tensor, metadata)
    for start in range(0, len(resolved), batch_size):
        prepared, kept = [], []  # (extractor, y_hat or image), and the item of each
        for position, item, found in resolved[start : start + batch_size]:
            try:
                prepared.append(runner.prepare(item[3], found))
                kept.append((position, item))
            except ComneckError as exc:
                report.fail(item[0], exc)
                advance()
        feats, notes = runner.compute(prepared, [item[0] for _, item in kept]) if prepared else ([], [])
        for note in notes:  # e.g. the neck interpolating its positions
            report.warn(note)
        for (position, (label, stem, _, _)), (extractor, _), f in zip(kept, prepared, feats):
            if isinstance(f, ComneckError):
                report.fail(label, f)
            else:
                results.append((position, label, stem, f, runner.metadata(extractor, label)))
            advance()
    if to_dir:
        for _, label, stem, tensor, meta in results:
            try:
                save_features(tensor.unsqueeze(0), Path(output) / f"{stem}.{fmt}", meta, force=force)
            except ComneckError as exc:
                report.fail(label, exc)
    elif results:
        import torch

        meta = dict(results[0][4], source=",".join(r[1] for r in results))
        save_features(torch.stack([r[3] for r in results]), Path(output), meta, force=force)


def check_one_shape(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Refuse, before any compute, inputs whose features cannot be stacked into one tensor: ``shapes`` holds each
    input's label and feature shape in input order; the error names the first input of each shape."""
    first: dict[tuple[int, ...], str] = {}
    for label, shape in shapes:
        first.setdefault(shape, label)
    if len(first) > 1:
        listed = ", ".join(f"{label} {shape}" for shape, label in first.items())
        raise ComneckError(f"inputs give features of different shapes ({listed}): the neck's token count follows "
                           "each record's image size; write them to a folder (`output` DIR/), or encode images of "
                           "one size", params=["output"])

"""``comneck batch encode|decode|features``: whole folders or path lists, on this machine or a Ray cluster.

The plan (which inputs, which outputs, in which chunks) is made once, on the driver. Each chunk of up to
``--batch-size`` inputs then goes through :meth:`Job.run`, the only implementation of the per-input work:

- ``--engine local`` calls it in this process, chunk after chunk;
- ``--engine ray`` hands the chunks to Ray Data (``ray.data.from_items``) and ``map_batches`` them through
  :class:`Worker`, a callable class that loads the models once per actor (GPU or CPU) and writes each output
  from the actor. The driver only reads back one small row per input: done, skipped or failed, and why.

Because the chunks are cut by the driver, in sorted order, whatever the engine, the same inputs share a
batched ``g_a`` in both engines and the outputs are byte-identical. A finished output is recognised by its
content (a ``.cnk`` parses and its record matches the codec, quality, weights and image size; an image
decodes completely at the record's size; a features file loads with the same settings) and skipped; a stale
or truncated one is redone. Failures are recorded per input in ``OUTPUT/errors.jsonl`` and the rest goes on.

The code lives in modules named for what they do: :mod:`~comneck_cli.batch.plan` (inputs and chunks),
:mod:`~comneck_cli.batch.resume` (is an output finished?), :mod:`~comneck_cli.batch.jobs` (the per-input work),
:mod:`~comneck_cli.batch.engines` (local and Ray), :mod:`~comneck_cli.batch.driver` (the run and its report) and
:mod:`~comneck_cli.batch.features` (``comneck features`` as a library function). Importing this package does not
import torch or Ray.
"""

from comneck_cli.batch.plan import Item, chunks, plan_inputs
from comneck_cli.batch.resume import cnk_output_ok, features_output_ok, image_output_ok
from comneck_cli.batch.jobs import CNK_SUFFIX, DECODE_FORMATS, DecodeJob, EncodeJob, FeaturesJob, Job
from comneck_cli.batch.engines import RAY_MISSING, RayOptions, Worker, ray_problem, run_local, run_ray
from comneck_cli.batch.driver import ERRORS_FILE, Report, execute

__all__ = [
    "CNK_SUFFIX", "DECODE_FORMATS", "ERRORS_FILE", "RAY_MISSING", "DecodeJob", "EncodeJob", "FeaturesJob", "Item",
    "Job", "RayOptions", "Report", "Worker", "chunks", "cnk_output_ok", "execute", "features_output_ok",
    "image_output_ok", "plan_inputs", "ray_problem", "run_local", "run_ray",
]

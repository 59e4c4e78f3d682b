"""Video inputs: a folder of frames or a video file becomes a ``.cnk`` stream with one record per frame.

Frames are coded independently (each with its own semantic guidance under ``--semantic``, CoTAM's frame-by-frame
extension to video MLLMs), so the stream is an ordinary multi-record stream: ``decode`` writes numbered frames and
``features`` stacks one feature tensor per frame. Frames are read one at a time, never the whole video at once.
Video files are read with PyAV (FFmpeg's bindings; ``pip install 'comneck[video]'``); a folder of frames needs
nothing beyond Pillow and is read in file-name order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from comneck_cli.formats import Limits

from comneck_cli.errors import InputError
from comneck_cli.io.images import IMAGE_SUFFIXES

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts"})
FRAME_SUFFIXES = frozenset(IMAGE_SUFFIXES)


def is_video_source(name: str) -> bool:
    """A folder (of frames) or a file with a video extension."""
    path = Path(name)
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder in name order (``frame_0001.png`` ...); an empty folder is an error."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise InputError(f"{folder} is a folder without image frames ({', '.join(sorted(FRAME_SUFFIXES))}); "
                           "pass images, a folder of frames or a video file")
    return files


def frames(source: str | Path, *, max_pixels: int | None = None, limits: Limits | None = None) -> Iterator[np.ndarray]:
    """uint8 H×W×3 frames of a frame folder or a video file, in order, one at a time.

    Every frame is held to the same size limits as an image (``limits``, default the environment's, with
    ``max_pixels`` applied), checked before its pixels are converted."""
    from comneck_cli.io.images import input_limits, read_image

    source = Path(source)
    limits = input_limits(limits, max_pixels)
    if source.is_dir():
        for path in frame_files(source):
            yield read_image(path, name=str(path), limits=limits)
        return
    yield from _video_frames(source, limits)


def _video_frames(path: Path, limits: Limits) -> Iterator[np.ndarray]:
    from comneck_cli.io.images import check_size

    try:
        import av
    except ImportError:
        raise InputError(f"{path}: reading video files needs PyAV; install it with pip install 'comneck[video]', "
                           "or pass a folder of frames") from None
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: cannot open the video ({exc})") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        stream = container.streams.video[0].codec_context
        check_size(stream.height, stream.width, str(path), limits)  # the header's size, before any frame decodes
        count = 0
        try:
            for frame in container.decode(video=0):
                check_size(frame.height, frame.width, f"{path} frame {count + 1}", limits)  # sizes may change
                count += 1
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise InputError(f"{path}: the video is damaged after frame {count} ({exc})") from None
    if count == 0:
        raise InputError(f"{path} holds no decodable video frames")

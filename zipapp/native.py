"""The zipapp's native msgpack: its C extension, loaded from a cache directory (Python cannot load one from
a zip).

``zipapp/build.py`` keeps msgpack with the C extension built for the building interpreter in the zip's folder
``trio_dht-native/`` (not importable: the name has a hyphen), with a ``manifest.json`` naming the files, the
interpreters that can load them (:func:`native_tag`) and a hash of their content. It ships this module as
``_trio_dht_native``, and the zip's ``__main__.py`` calls :func:`enable` before anything imports msgpack.
When the tag matches the running interpreter, :func:`enable` extracts the package once to
``$XDG_CACHE_HOME/trio_dht/native-<hash>/`` (default ``~/.cache``; a temporary directory renamed into place,
so processes starting together are safe), reuses it on later starts, and puts it first on ``sys.path``.
Anything else (``TRIO_DHT_NATIVE=0``, another platform or Python, an unwritable cache, an import error)
leaves the zip's pure-Python msgpack in use, logged at DEBUG.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

#: The zip's folder holding the native packages, and its manifest.
FOLDER = "trio_dht-native"
MANIFEST = f"{FOLDER}/manifest.json"
#: ``TRIO_DHT_NATIVE=0`` keeps the pure-Python msgpack.
ENV = "TRIO_DHT_NATIVE"
#: The package extracted, and the module that proves its C extension loads.
PACKAGE = "msgpack"
EXTENSION = "msgpack._cmsgpack"

log = logging.getLogger("trio_dht.native")


def native_tag() -> str:
    """Which interpreters load the C extensions built for this one: implementation and version, OS, CPU and
    extension suffix (e.g. ``cpython-311-linux-x86_64.cpython-311-x86_64-linux-gnu.so``)."""
    machine = os.uname().machine if hasattr(os, "uname") else "unknown"
    return f"{sys.implementation.cache_tag}-{sys.platform}-{machine}{EXTENSION_SUFFIXES[0]}"


def content_hash(tag: str, files: Iterable[tuple[str, bytes]]) -> str:
    """A short hash of the tag and every ``(path, content)``: names the cache directory."""
    digest = hashlib.sha256(tag.encode())
    for name, data in sorted(files):
        digest.update(b"\0%s\0%d\0" % (name.encode(), len(data)))
        digest.update(data)
    return digest.hexdigest()[:16]


def cache_root(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/trio_dht`` (when absolute, as the spec asks), else ``~/.cache/trio_dht``."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "trio_dht"


def extract(read: Callable[[str], bytes], files: Iterable[str], folder: Path) -> None:
    """Write ``files`` (zip paths under :data:`FOLDER`, read with ``read``) to ``folder``, atomically: into a
    temporary sibling renamed at the end. When another process renamed its copy first, that copy is kept."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name in files:
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(read(name))
        try:
            partial.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def enable(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Put the zip's native msgpack first on ``sys.path`` and return its directory; ``None`` (and a DEBUG
    line) when it is not used. Never raises."""
    if environ.get(ENV) == "0":
        log.debug("native msgpack off (%s=0): pure-Python msgpack", ENV)
        return None
    if PACKAGE in sys.modules:
        log.debug("msgpack already imported: not replaced")
        return None
    try:
        folder = _prepare(environ)
    except Exception as exc:
        log.debug("native msgpack unavailable (%s: %s): pure-Python msgpack", type(exc).__name__, exc)
        return None
    if folder is None:
        return None
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module(EXTENSION)
    except Exception as exc:  # a broken copy, a missing system library, a noexec file system...
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
        log.debug(
            "native msgpack in %s fails to import (%s: %s): pure-Python msgpack",
            folder,
            type(exc).__name__,
            exc,
        )
        return None
    log.debug("native msgpack from %s", folder)
    return folder


def _prepare(environ: Mapping[str, str]) -> Path | None:
    """The cache directory holding the native packages of the running zip (extracted if missing), or
    ``None`` when this zip has none for the running interpreter."""
    archive = getattr(__loader__, "archive", None)  # a zipimporter when run from the zipapp
    if archive is None:
        log.debug("not run from a zip: nothing to extract")
        return None

    def read(name: str) -> bytes:
        return __loader__.get_data(os.path.join(archive, FOLDER, name))

    try:
        manifest = json.loads(read("manifest.json"))
    except OSError:
        log.debug("%s has no native code", archive)
        return None
    if manifest["tag"] != native_tag():
        log.debug("native code built for %s, not this %s: pure-Python msgpack", manifest["tag"], native_tag())
        return None
    folder = cache_root(environ) / f"native-{manifest['hash']}"
    if not folder.is_dir():
        files = {name: read(name) for name in manifest["files"]}
        if content_hash(manifest["tag"], files.items()) != manifest["hash"]:
            raise ValueError(f"{archive}: native files do not match their manifest")
        extract(files.__getitem__, files, folder)
    return folder

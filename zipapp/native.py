"""The zipapp's native packages (msgpack, cffi's backend, cryptography): their C extensions, loaded from a
cache directory (Python cannot load one from a zip).

``zipapp/build.py`` keeps each of :data:`PACKAGES`, with the C extensions built for the building interpreter,
in the zip's folder ``trio_dht-native/<distribution>/`` (not importable: the name has a hyphen), beside a
``manifest.json`` naming the interpreters that can load them (:func:`native_tag`), the packages, every file
with its SHA-256, and a hash of all of it. Their bytecode is there too, compiled to be used without comparing
it with the source: nothing is compiled at the first start, nothing unchecked is written to the cache. It
ships this module as ``_trio_dht_native``, and the zip's ``__main__.py`` calls :func:`enable` before anything
imports those packages. When the tag matches the running interpreter, :func:`enable` extracts the files once
to ``$XDG_CACHE_HOME/trio_dht/native-<hash>/`` (default ``~/.cache``; a temporary directory renamed into
place, so processes starting together are safe). On later starts it checks every cached file against its
hash and rewrites one that differs (a temporary file renamed over it) before anything is imported. Then,
package by package, it puts ``native-<hash>/<distribution>`` first on ``sys.path`` and imports the module
that proves the C extension loads; a package whose import fails is taken off the path again. Anything else
(``TRIO_DHT_NATIVE=0``, another platform or Python, an unwritable cache) uses none of them. Then msgpack runs
its pure-Python code from the zip, and ``cryptography`` (and so ``trio_dht.crypto``) is missing:
:mod:`trio_dht.signature` and Web Push use ``trio_dht.purecrypto``, and an identity (``-i``,
``--certificate``) is refused. Every such case is logged at DEBUG.
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
from typing import NamedTuple

#: The zip's folder holding the native packages, and its manifest.
FOLDER = "trio_dht-native"
MANIFEST = f"{FOLDER}/manifest.json"
#: ``TRIO_DHT_NATIVE=0`` uses none of the native packages.
ENV = "TRIO_DHT_NATIVE"


class NativePackage(NamedTuple):
    """A distribution whose C extension the zipapp carries, kept in ``FOLDER/<distribution>/``."""

    #: Its name (as pip spells its ``.dist-info`` folder), and its folder in the zip and the cache.
    distribution: str
    #: The top-level modules (packages or extension modules) of it that the zipapp carries.
    modules: tuple[str, ...]
    #: The module whose import proves its C extension loads.
    probe: str


#: In load order: cryptography's Rust extension imports ``_cffi_backend``. Of the ``cffi`` distribution only
#: ``_cffi_backend`` is imported at run time (its ``cffi`` package generates bindings at build time).
PACKAGES = (
    NativePackage("msgpack", ("msgpack",), "msgpack._cmsgpack"),
    NativePackage("cffi", ("_cffi_backend",), "_cffi_backend"),
    NativePackage("cryptography", ("cryptography",), "cryptography.hazmat.bindings._rust"),
)

log = logging.getLogger("trio_dht.native")


def native_tag() -> str:
    """Which interpreters load the C extensions built for this one: implementation and version, OS, CPU and
    extension suffix (e.g. ``cpython-311-linux-x86_64.cpython-311-x86_64-linux-gnu.so``)."""
    machine = os.uname().machine if hasattr(os, "uname") else "unknown"
    return f"{sys.implementation.cache_tag}-{sys.platform}-{machine}{EXTENSION_SUFFIXES[0]}"


def file_hash(data: bytes) -> str:
    """A file's SHA-256, as the manifest lists it."""
    return hashlib.sha256(data).hexdigest()


def content_hash(tag: str, files: Iterable[tuple[str, bytes]]) -> str:
    """A short hash of the tag and every ``(path, content)``: names the cache directory."""
    digest = hashlib.sha256(tag.encode())
    for name, data in sorted(files):
        digest.update(b"\0%s\0%d\0" % (name.encode(), len(data)))
        digest.update(data)
    return digest.hexdigest()[:16]


def manifest(tag: str, packages: Iterable[str], files: Mapping[str, bytes]) -> dict:
    """The manifest of ``files`` (paths under :data:`FOLDER`) holding ``packages`` built for ``tag``."""
    return {
        "tag": tag,
        "hash": content_hash(tag, files.items()),
        "packages": list(packages),
        "files": {name: file_hash(files[name]) for name in sorted(files)},
    }


def cache_root(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/trio_dht`` (when absolute, as the spec asks), else ``~/.cache/trio_dht``."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "trio_dht"


def _private(path: Path) -> bool:
    """Whether only this user can change ``path`` (created if missing): a directory of ours (or a link to
    one). One that group or others may write is made private (what was put in it meanwhile, :func:`repair`
    finds).
    Always true where there are no user ids (Windows)."""
    if not hasattr(os, "getuid"):
        return True
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    real = path.resolve()  # a link is judged by the directory it leads to
    st = real.stat()
    if st.st_uid != os.getuid():
        return False
    if st.st_mode & 0o022:
        real.chmod(st.st_mode & 0o755)
    return True


def extract(read: Callable[[str], bytes], files: Iterable[str], folder: Path) -> None:
    """Write ``files`` (zip paths under :data:`FOLDER`, read with ``read``) to ``folder``, atomically: into a
    temporary sibling renamed at the end. When another process renamed its copy first, that copy is kept."""
    import shutil
    import tempfile

    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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


def repair(read: Callable[[str], bytes], hashes: Mapping[str, str], folder: Path) -> list[str]:
    """Rewrite each of ``hashes``'s files (path -> SHA-256) that is missing from ``folder`` or differs, each
    atomically (a temporary sibling renamed over it), and delete every file ``hashes`` does not list (a
    module planted beside ours would be imported first); return the paths rewritten or deleted."""
    import tempfile

    rewritten = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        compiled_here = path.parent.name == "__pycache__" and ".opt-" in path.name  # python -O's own
        if (path.is_symlink() or not path.is_dir()) and name not in hashes and not compiled_here:
            path.unlink()
            rewritten.append(name)
    for name, expected in hashes.items():
        path = folder / name
        try:
            with path.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() == expected:
                    continue
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(read(name))
            os.replace(partial, path)
        except BaseException:
            os.unlink(partial)
            raise
        rewritten.append(name)
    return rewritten


def enable(environ: Mapping[str, str] = os.environ) -> dict[str, Path]:
    """Put each of the zip's native packages that loads first on ``sys.path``; return them (distribution ->
    its directory), empty (and a DEBUG line) when none is used. Never raises."""
    if environ.get(ENV) == "0":
        log.debug("native packages off (%s=0): pure-Python msgpack, no cryptography", ENV)
        return {}
    try:
        prepared = _prepare(environ)
    except Exception as exc:
        log.debug("native packages unavailable (%s: %s): none used", _name(exc), exc)
        return {}
    if prepared is None:
        return {}
    folder, distributions = prepared
    loaded = {}
    for package in PACKAGES:
        if package.distribution in distributions:
            path = folder / package.distribution
            if _load(package, path):
                loaded[package.distribution] = path
    return loaded


def _load(package: NativePackage, path: Path) -> bool:
    """Put ``path`` first on ``sys.path`` and import ``package.probe``; undo both when that fails."""
    if any(_ours(name, package) for name in sys.modules):
        log.debug("%s already imported: not replaced", package.distribution)
        return False
    sys.path.insert(0, str(path))
    try:
        importlib.import_module(package.probe)
    except Exception as exc:  # a broken copy, a missing system library, a noexec file system...
        sys.path.remove(str(path))
        for name in [name for name in sys.modules if _ours(name, package)]:
            del sys.modules[name]
        log.debug("native %s in %s fails to import (%s: %s)", package.distribution, path, _name(exc), exc)
        return False
    log.debug("native %s from %s", package.distribution, path)
    return True


def _ours(module: str, package: NativePackage) -> bool:
    return module.partition(".")[0] in package.modules


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def _prepare(environ: Mapping[str, str]) -> tuple[Path, list[str]] | None:
    """The cache directory holding the native packages of the running zip (extracted if missing, repaired if
    a file differs from its hash) and the distributions it holds, or ``None`` when this zip has none for the
    running interpreter."""
    archive = getattr(__loader__, "archive", None)  # a zipimporter when run from the zipapp
    if archive is None:
        log.debug("not run from a zip: nothing to extract")
        return None
    try:
        manifest = json.loads(__loader__.get_data(os.path.join(archive, MANIFEST)))
    except OSError:
        log.debug("%s has no native code", archive)
        return None
    if manifest["tag"] != native_tag():
        log.debug("native code built for %s, not this %s: not used", manifest["tag"], native_tag())
        return None
    hashes: dict[str, str] = manifest["files"]

    def read(name: str) -> bytes:
        data = __loader__.get_data(os.path.join(archive, FOLDER, name))
        if file_hash(data) != hashes[name]:
            raise ValueError(f"{archive}: {FOLDER}/{name} does not match its manifest")
        return data

    folder = cache_root(environ) / f"native-{manifest['hash']}"
    if not _private(folder.parent) or (folder.is_dir() and not _private(folder)):
        # Another user could change what we would import: a private copy for this run instead.
        import atexit
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="trio_dht-native-")) / "native"
        atexit.register(shutil.rmtree, folder.parent, ignore_errors=True)
        log.debug("%s is not this user's: native packages extracted to %s", cache_root(environ), folder)
    if not folder.is_dir():
        extract(read, hashes, folder)
    elif rewritten := repair(read, hashes, folder):
        log.debug("%s: rewrote %s, which differed from the zipapp's copy", folder, ", ".join(rewritten))
    return folder, manifest["packages"]

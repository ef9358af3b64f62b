"""Build ``dist/trio_dht.pyz``: trio_dht and its pinned dependencies in one zipapp.

    python3 zipapp/build.py [-o dist/trio_dht.pyz]

Steps: ``pip install --target`` the runtime dependencies pinned in pyproject.toml plus this package;
copy the native packages (``native.PACKAGES``: msgpack, cffi's ``_cffi_backend``, cryptography), with their
C extensions for this interpreter, to the folder ``trio_dht-native/<distribution>/`` with one manifest (the
interpreters that can load them, every file with its hash); cffi's and cryptography's ``.dist-info`` (their
licences) go with them. Then delete every other C extension (msgpack and markupsafe fall back to pure
Python), every other distribution that needs one (cffi and cryptography are left only in
``trio_dht-native/``) and what is not needed at run time; compile legacy ``.pyc`` files beside the sources
(fast start on this Python; other Pythons >= 3.11 import the sources); add ``zipapp/native.py`` as
``_trio_dht_native`` and an entry point that calls it; zip with the stdlib ``zipapp``. The result runs on a
bare CPython >= 3.11 on Linux or macOS (on Windows trio needs cffi, a C extension). At start-up, on an
interpreter matching the manifest, it extracts the native packages once to
``~/.cache/trio_dht/native-<hash>/`` and imports them from there (see ``zipapp/native.py``;
``TRIO_DHT_NATIVE=0`` turns that off); anywhere else it uses the pure-Python msgpack and has no
cryptography (``trio_dht.purecrypto`` verifies signatures and encrypts Web Push messages; an identity is
refused).
"""

from __future__ import annotations

import argparse
import compileall
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipapp
from pathlib import Path
from py_compile import PycInvalidationMode

import native

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "dist" / "trio_dht.pyz"
INTERPRETER = "/usr/bin/env python3"
#: ``zipapp/native.py`` is shipped as this module, which the entry point runs before anything imports msgpack.
NATIVE_MODULE = "_trio_dht_native"
ENTRY_POINT = f"""import sys
import {NATIVE_MODULE}
{NATIVE_MODULE}.enable()
from trio_dht.__main__ import main
sys.exit(main())
"""
NATIVE = ("*.so", "*.so.*", "*.pyd", "*.dylib")
#: Distributions whose C extensions are optional speed-ups: without them they run their pure-Python code,
#: which stays in the zip's root. Any other distribution that ships native code cannot run from a zip: it is
#: left out of the root whole, kept only in ``native.FOLDER`` when it is one of ``native.PACKAGES``; the
#: code that uses it must do without it where those are not loaded (``cryptography``: trio_dht.purecrypto
#: stands in for it, and an identity is refused).
PURE_PYTHON_FALLBACK = {"msgpack", "markupsafe"}
#: Files and folders dropped from the staged packages: C extensions and their sources, type stubs,
#: console-script launchers (they cannot run from a zip), bytecode caches and trio's own test suite.
BUILD_ONLY = ("*.c", "*.h", "*.pyx", "*.pxd", "*.pyi")
STRIP_FILES = (*NATIVE, *BUILD_ONLY)
STRIP_DIRS = ("bin", "__pycache__", "trio/_tests")
#: What pip needs to build this package from a copy of the source tree.
PROJECT_FILES = ("pyproject.toml", "README.md", "trio_dht")


def runtime_requirements() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml, pinned there."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def install(stage: Path, work: Path) -> None:
    """``pip install --target stage`` the runtime dependencies and this package (from a clean copy)."""
    source = work / "source"
    source.mkdir()
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    pip += ["--root-user-action", "ignore"]
    subprocess.run([*pip, "--target", str(stage), *runtime_requirements(), str(source)], check=True)


def dist_info(stage: Path, distribution: str) -> Path:
    """The installed ``.dist-info`` folder of ``distribution``."""
    (found,) = stage.glob(f"{distribution}-*.dist-info")
    return found


def drop_native_distributions(stage: Path) -> list[str]:
    """Delete every installed distribution that ships native code and has no pure-Python fallback."""
    dropped = []
    for info in sorted(stage.glob("*.dist-info")):
        name = info.name.split("-", 1)[0].lower().replace("_", "-")
        files = [stage / line.split(",", 1)[0] for line in (info / "RECORD").read_text().splitlines()]
        files = [path for path in files if path.resolve().is_relative_to(stage.resolve())]
        if name in PURE_PYTHON_FALLBACK or not any(
            path.match(pattern) for path in files for pattern in NATIVE
        ):
            continue
        for path in files:
            path.unlink(missing_ok=True)
        folders = {folder for path in files for folder in path.parents if folder.is_relative_to(stage)}
        for folder in sorted(folders - {stage}, key=lambda folder: len(folder.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        shutil.rmtree(info, ignore_errors=True)
        dropped.append(name)
    return dropped


def stage_native(stage: Path) -> tuple[str, list[str]] | None:
    """Copy each of ``native.PACKAGES`` that has a C extension, without what is not needed at run time, to
    ``native.FOLDER/<distribution>/`` (with its ``.dist-info`` unless the root keeps that), compile it and
    write the manifest; return the native tag and the distributions kept, or ``None`` when there is none."""
    folder = stage / native.FOLDER
    ignore = shutil.ignore_patterns(*BUILD_ONLY, "__pycache__")
    kept = []
    for package in native.PACKAGES:
        modules = [stage / name for name in package.modules if (stage / name).is_dir()]
        modules += [path for name in package.modules for path in stage.glob(f"{name}.*") if path.is_file()]
        files = [file for path in modules for file in ([path] if path.is_file() else path.rglob("*"))]
        if not any(file.match(pattern) for file in files for pattern in NATIVE):
            print(f"{package.distribution}: no C extension installed, left out of {native.FOLDER}")
            continue
        target = folder / package.distribution
        if package.distribution not in PURE_PYTHON_FALLBACK:
            modules.append(dist_info(stage, package.distribution))  # its metadata and licences
        for path in modules:
            if path.is_dir():
                shutil.copytree(path, target / path.name, ignore=ignore)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
        kept.append(package.distribution)
    if not kept:
        return None
    for path in sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # it held type stubs only
    # Bytecode the importer uses without comparing it with the source (the manifest's hashes cover both):
    # nothing to compile at the first start, nothing written to the cache later.
    if not compileall.compile_dir(folder, quiet=1, invalidation_mode=PycInvalidationMode.UNCHECKED_HASH):
        raise SystemExit("compileall failed")
    paths = [path for path in folder.rglob("*") if path.is_file()]
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in paths}
    tag = native.native_tag()
    manifest = native.manifest(tag, kept, files)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return tag, kept


def strip(stage: Path) -> None:
    """Delete C extensions and what is not needed at run time, but in ``native.FOLDER`` (staged already); fail
    if any other native code is left."""
    kept = stage / native.FOLDER
    for pattern in STRIP_DIRS:
        for path in sorted(stage.glob(f"**/{pattern}"), reverse=True):
            if path.is_dir() and not path.is_relative_to(kept):
                shutil.rmtree(path)
    for pattern in STRIP_FILES:
        for path in stage.rglob(pattern):
            if not path.is_relative_to(kept):
                path.unlink()
    left = [path for pattern in NATIVE for path in stage.rglob(pattern) if not path.is_relative_to(kept)]
    if left:
        raise SystemExit(f"native code left in the zipapp: {', '.join(map(str, left))}")


def build(output: Path) -> Path:
    """Build the zipapp at ``output`` and return its path."""
    with tempfile.TemporaryDirectory(prefix="trio_dht_pyz_") as tmp:
        work = Path(tmp)
        stage = work / "stage"
        install(stage, work)
        staged = stage_native(stage)
        tag, kept = staged or ("", [])
        for name in drop_native_distributions(stage):
            if name not in kept:
                print(f"left out {name}: it needs its C extension, which cannot run from a zip")
        strip(stage)
        shutil.copy2(Path(native.__file__), stage / f"{NATIVE_MODULE}.py")
        (stage / "__main__.py").write_text(ENTRY_POINT)
        skipped = re.compile(re.escape(str(stage / native.FOLDER)))  # compiled for the cache already
        if not compileall.compile_dir(stage, quiet=1, legacy=True, rx=skipped):
            raise SystemExit("compileall failed")
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")
        zipapp.create_archive(stage, partial, interpreter=INTERPRETER, compressed=True)
        partial.replace(output)
    if kept:
        print(f"kept the C extensions of {', '.join(kept)} for {tag}")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    output = build(parser.parse_args().output)
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

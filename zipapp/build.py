"""Build ``dist/trio_dht.pyz``: trio_dht and its pinned dependencies in one pure-Python zipapp.

    python3 zipapp/build.py [-o dist/trio_dht.pyz]

Steps: ``pip install --target`` the runtime dependencies pinned in pyproject.toml plus this package;
copy msgpack, with its C extension for this interpreter, to the folder ``trio_dht-native/`` with a manifest
(its files, their hash and the interpreters that can load them); delete every other C extension (msgpack
and markupsafe fall back to pure Python) and what is not needed at run time; compile legacy ``.pyc`` files
beside the sources (fast start on this Python; other Pythons >= 3.11 import the sources); add
``zipapp/native.py`` as ``_trio_dht_native`` and an entry point that calls it; zip with the stdlib
``zipapp``. The result runs on a bare CPython >= 3.11 on Linux or macOS (on Windows trio needs cffi, a C
extension). At start-up, on an interpreter matching the manifest, it extracts the native msgpack once
to ``~/.cache/trio_dht/native-<hash>/`` and imports it from there (see ``zipapp/native.py``;
``TRIO_DHT_NATIVE=0`` turns that off); anywhere else it uses the pure-Python msgpack.
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
#: Distributions whose C extensions are optional speed-ups: without them they run their pure-Python code.
#: Any other distribution that ships native code cannot run from a zip and is left out whole (with a note);
#: the code that uses it must do without it (`cryptography`: trio_dht.purecrypto stands in for it).
PURE_PYTHON_FALLBACK = {"msgpack", "markupsafe"}
#: Of those, the packages whose C extension ships too, in ``native.FOLDER``, to be extracted at start-up.
NATIVE_PACKAGES = (native.PACKAGE,)
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


def drop_native_distributions(stage: Path) -> list[str]:
    """Delete every installed distribution that ships native code and has no pure-Python fallback."""
    dropped = []
    for dist_info in sorted(stage.glob("*.dist-info")):
        name = dist_info.name.split("-", 1)[0].lower().replace("_", "-")
        files = [stage / line.split(",", 1)[0] for line in (dist_info / "RECORD").read_text().splitlines()]
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
        shutil.rmtree(dist_info, ignore_errors=True)
        dropped.append(name)
    return dropped


def stage_native(stage: Path) -> str | None:
    """Copy each of NATIVE_PACKAGES that has a C extension, without what is not needed at run time, to
    ``native.FOLDER`` and write its manifest; return the native tag, or ``None`` when there is nothing."""
    folder = stage / native.FOLDER
    for package in NATIVE_PACKAGES:
        if any((stage / package).rglob(pattern) for pattern in NATIVE):
            ignore = shutil.ignore_patterns(*BUILD_ONLY, "__pycache__")
            shutil.copytree(stage / package, folder / package, ignore=ignore)
        else:
            print(f"{package}: no C extension installed, the zipapp uses its pure-Python code")
    if not folder.is_dir():
        return None
    paths = [path for path in folder.rglob("*") if path.is_file()]
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in paths}
    tag = native.native_tag()
    manifest = {"tag": tag, "hash": native.content_hash(tag, files.items()), "files": sorted(files)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return tag


def strip(stage: Path) -> None:
    """Delete C extensions (but those kept in ``native.FOLDER``) and what is not needed at run time; fail if
    any other native code is left."""
    kept = stage / native.FOLDER
    for pattern in STRIP_DIRS:
        for path in sorted(stage.glob(f"**/{pattern}"), reverse=True):
            if path.is_dir():
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
        for name in drop_native_distributions(stage):
            print(f"left out {name}: it needs its C extension, which cannot run from a zip")
        tag = stage_native(stage)
        strip(stage)
        shutil.copy2(Path(native.__file__), stage / f"{NATIVE_MODULE}.py")
        (stage / "__main__.py").write_text(ENTRY_POINT)
        kept = re.compile(re.escape(str(stage / native.FOLDER)))  # imported from the cache: no .pyc needed
        if not compileall.compile_dir(stage, quiet=1, legacy=True, rx=kept):
            raise SystemExit("compileall failed")
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")
        zipapp.create_archive(stage, partial, interpreter=INTERPRETER, compressed=True)
        partial.replace(output)
    if tag:
        print(f"kept msgpack's C extension for {tag}")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    output = build(parser.parse_args().output)
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

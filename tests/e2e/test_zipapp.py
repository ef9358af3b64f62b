"""``zipapp/build.py`` and the zipapp it builds, run by a bare CPython that has none of the dependencies."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, ping, trio_dht_process
from cryptography.hazmat.primitives.asymmetric import rsa

from trio_dht import crypto, signature
from trio_dht.push import webpush_crypto
from trio_dht.value import Value

ROOT = Path(__file__).resolve().parents[2]
#: zipapp/native.py, shipped in the zipapp as ``_trio_dht_native``.
_spec = importlib.util.spec_from_file_location("zipapp_native", ROOT / "zipapp" / "native.py")
assert _spec is not None and _spec.loader is not None
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)
#: Modules that cannot be imported from the zipapp without its native packages (no cryptography).
NOT_IN_ZIPAPP: set[str] = {"trio_dht.crypto"}
#: The C extensions the zipapp carries in ``native.FOLDER`` (paths under it, without their suffix).
NATIVE_EXTENSIONS = {
    "msgpack": "msgpack/msgpack/_cmsgpack",
    "cffi": "cffi/_cffi_backend",
    "cryptography": "cryptography/cryptography/hazmat/bindings/_rust",
}
#: The licence files of the distributions kept only in ``native.FOLDER`` (paths under it, ``*`` a version).
NATIVE_LICENCES = (
    "cffi/cffi-*.dist-info/licenses/LICENSE",
    "cryptography/cryptography-*.dist-info/licenses/LICENSE",
    "cryptography/cryptography-*.dist-info/licenses/LICENSE.APACHE",
    "cryptography/cryptography-*.dist-info/licenses/LICENSE.BSD",
)
#: With the zip on the path but not its native packages (the loader does not run): imports every module,
#: then, with the pure-Python crypto: verifies a signed value (argv[2], packed, hex) and a tampered copy, and
#: encrypts a Web Push message to the keys p256dh (argv[3]) and auth (argv[4]).
IMPORT_ALL = """
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import trio_dht
failed = {}
for module in pkgutil.walk_packages(trio_dht.__path__, "trio_dht."):
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        failed[module.name] = f"{type(exc).__name__}: {exc}"
from dataclasses import replace
from trio_dht import signature
from trio_dht.push import webpush_crypto
from trio_dht.value import Value
signed = Value.unpack(bytes.fromhex(sys.argv[2]))
p256dh, auth = bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
print(json.dumps({
    "failed": failed,
    "backends": [signature.backend.name, webpush_crypto.backend.name],
    "verified": signature.verify(signed),
    "tampered_verified": signature.verify(replace(signed, data=signed.data + b"!", _packed=None)),
    "webpush": webpush_crypto.encrypt(b"pushed from the zipapp", p256dh, auth).hex(),
}))
"""


#: What the zipapp's start-up does before importing trio_dht, then which msgpack the wire codec uses and
#: where cryptography comes from (None: not importable).
NATIVE_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import _trio_dht_native
loaded = _trio_dht_native.enable()
from trio_dht.wire import msgpack_codec
import msgpack
try:
    import cryptography.hazmat.bindings._rust
    import trio_dht.crypto
except ImportError:
    cryptography = None
obj = {"a": b"x", 1: ["y", -2]}
print(json.dumps({
    "loaded": {name: str(path) for name, path in loaded.items()},
    "pure": msgpack_codec.PURE,
    "msgpack": msgpack.__file__,
    "roundtrip": msgpack_codec.unpackb(msgpack_codec.packb(obj)) == obj,
    "cryptography": cryptography and cryptography.__file__,
}))
"""
#: After the zipapp's start-up: a new identity signs a value (argv[2], hex), which is verified, a tampered
#: copy not; the identity is saved to argv[3].pem/.crt and loaded again.
SIGN_CHECK = """
import json, sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import _trio_dht_native
loaded = _trio_dht_native.enable()
import cryptography
from trio_dht import crypto, signature
from trio_dht.push import webpush_crypto
from trio_dht.value import Value
identity = crypto.Identity.generate(bits=2048)
signed = identity.sign_value(Value.unpack(bytes.fromhex(sys.argv[2])))
path = Path(sys.argv[3])
identity.save(path.with_suffix(".pem"), path.with_suffix(".crt"))
again = crypto.Identity.load(path.with_suffix(".pem"), path.with_suffix(".crt"))
print(json.dumps({
    "loaded": sorted(loaded),
    "cryptography": cryptography.__file__,
    "verify": signature.backend.name == "cryptography",
    "webpush": webpush_crypto.backend.name,
    "verified": signature.verify(signed),
    "tampered_verified": signature.verify(replace(signed, data=signed.data + b"!", _packed=None)),
    "same_key": again.id == identity.id,
    "signed": signed.packed().hex(),
    "key_id": identity.id.hex(),
}))
"""


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the zipapp run by each test extracts its native packages (not the user's ~/.cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("TRIO_DHT_NATIVE", raising=False)
    monkeypatch.delenv("MSGPACK_PUREPYTHON", raising=False)
    return cache


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zipapp, built once per session (outside dist/, so a user's build is left alone)."""
    output = tmp_path_factory.mktemp("pyz") / "trio_dht.pyz"
    subprocess.run([sys.executable, ROOT / "zipapp" / "build.py", "-o", output], check=True, timeout=600)
    return output


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv without pip, in which none of the dependencies can be imported."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    for module in ("trio", "msgpack", "quart", "trio_dht"):
        # (not from the checkout, which `python -c` would put on the path)
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=30, cwd=venv)
        assert probe.returncode != 0, f"{module} is importable in the bare venv"
    return python


def test_pyz_is_pure_python_with_compiled_sources(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as zf:
        names = zf.namelist()
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert {"__main__.py", "_trio_dht_native.py"} <= set(names)
    native_or_build_only = [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".c", ".pyx", ".pyi"))]
    extensions = tuple(f"{native.FOLDER}/{path}." for path in NATIVE_EXTENSIONS.values())
    assert [n for n in native_or_build_only if not n.startswith(extensions)] == []
    # cffi and cryptography only in native.FOLDER, out of the zip's importable root
    assert not [n for n in names if n.startswith(("cryptography", "cffi", "_cffi_backend"))]
    root = [n for n in names if not n.startswith(f"{native.FOLDER}/")]  # (its bytecode: see the next test)
    assert not [n for n in root if "__pycache__/" in n or n.startswith(("bin/", "trio/_tests/"))]
    for module in ("trio_dht/app", "trio_dht/__main__", "trio/__init__", "msgpack/fallback"):
        assert {f"{module}.py", f"{module}.pyc"} <= set(names), module
    assert any(n.startswith("trio_dht-") and n.endswith(".dist-info/METADATA") for n in names)


def test_pyz_keeps_the_native_packages_for_this_python(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as zf:
        manifest = json.loads(zf.read(native.MANIFEST))
        files = {name: zf.read(f"{native.FOLDER}/{name}") for name in manifest["files"]}
        kept = sorted(
            n.removeprefix(f"{native.FOLDER}/") for n in zf.namelist() if n.startswith(native.FOLDER)
        )
    assert manifest["tag"] == native.native_tag()
    assert manifest["hash"] == native.content_hash(manifest["tag"], files.items())
    assert manifest["packages"] == ["msgpack", "cffi", "cryptography"]
    assert manifest["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    folders = {f"{parent}/" for name in files for parent in Path(name).parents if parent != Path(".")}
    assert kept == sorted(["", *folders, "manifest.json", *files])  # no C sources, no legacy .pyc
    sources = [Path(name) for name in files if name.endswith(".py")]
    for source in sources:  # bytecode used unchecked: the manifest's hashes cover it
        pyc = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
        assert int.from_bytes(files[pyc.as_posix()][4:8], "little") == 0b01, pyc  # hash-based, unchecked
    assert len([name for name in files if name.endswith(".pyc")]) == len(sources)
    assert "msgpack/msgpack/__init__.py" in files
    assert "cryptography/cryptography/hazmat/primitives/asymmetric/rsa.py" in files
    extensions = sorted(n for n in files if n.endswith(".so"))
    assert len(extensions) == len(NATIVE_EXTENSIONS)
    for extension, path in zip(extensions, sorted(NATIVE_EXTENSIONS.values()), strict=True):
        assert extension.startswith(f"{path}.") and extension.endswith(tuple(native.EXTENSION_SUFFIXES))
    for licence in NATIVE_LICENCES:
        assert [n for n in files if Path(n).match(licence)], licence


def test_pyz_version_on_a_bare_python(pyz: Path, bare_python: Path) -> None:
    result = subprocess.run([bare_python, pyz, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"trio-dht {metadata.version('trio-dht')}\n"


@pytest.mark.parametrize(
    "flags", [["-i"], ["--certificate", "node.crt", "--privkey", "node.pem"]], ids=["-i", "--certificate"]
)
@pytest.mark.parametrize("where", ["native off", "another python"])
def test_pyz_without_its_native_packages_refuses_an_identity_in_one_line(
    pyz: Path, bare_python: Path, tmp_path: Path, cache_home: Path, flags: list[str], where: str
) -> None:
    """Without cryptography (TRIO_DHT_NATIVE=0, or native code built for another interpreter) -i and
    --certificate are refused with one line and exit code 1, not a traceback."""
    (tmp_path / "node.crt").write_text("not read")
    (tmp_path / "node.pem").write_text("not read")
    env = {**os.environ, "TRIO_DHT_NATIVE": "0"} if where == "native off" else None
    program = pyz if where == "native off" else retagged(pyz, tmp_path)
    result = subprocess.run(
        [bare_python, program, *flags, "-p", "0", "--bind", "127.0.0.1", "--no-ipv6", "--no-proxy"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "an identity needs the cryptography package" in result.stderr
    assert len((result.stdout + result.stderr).splitlines()) == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not cache_home.exists()


def test_pyz_signs_and_verifies_with_its_cryptography(pyz: Path, bare_python: Path, tmp_path: Path) -> None:
    """On the interpreter it was built for, the zipapp has cryptography: trio_dht.crypto makes an identity
    and signs, trio_dht.signature verifies with cryptography, not the pure-Python code."""
    value = Value(b"signed in the zipapp", type=3, id=5, seq=1)
    result = subprocess.run(
        [bare_python, "-c", SIGN_CHECK, pyz, value.packed().hex(), tmp_path / "node"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loaded"] == ["cffi", "cryptography", "msgpack"]
    assert not report["cryptography"].startswith(str(pyz))  # from the cache, not the zip
    assert (report["verify"], report["webpush"]) == (True, "cryptography")
    assert (report["verified"], report["tampered_verified"], report["same_key"]) == (True, False, True)
    signed = Value.unpack(bytes.fromhex(report["signed"]))
    assert (signed.data, signed.type, signed.id) == (value.data, value.type, value.id)
    assert signature.verify(signed)  # and here, by the test's own cryptography
    saved = crypto.Identity.load(tmp_path / "node.pem", tmp_path / "node.crt")
    assert saved.id.hex() == report["key_id"]


async def test_pyz_runs_with_a_new_identity_and_saves_it(
    pyz: Path, bare_python: Path, tmp_path: Path
) -> None:
    path = tmp_path / "node"
    command = [bare_python, pyz, *LOOPBACK_NODE, "--no-proxy", "-i", "--save-identity", path]
    async with trio_dht_process(command, timeout=60) as node:
        assert node.process.returncode is None, node.output
        assert await node.stop() == 0
    assert "Traceback" not in node.output
    saved = crypto.Identity.load(tmp_path / "node.pem", tmp_path / "node.crt")
    assert f"identity: public key id {saved.id.hex()}" in node.output
    signed = saved.sign_value(Value(b"with the saved key", id=7))
    assert signature.verify(signed)


def test_pyz_uses_the_pure_python_fallbacks(pyz: Path, bare_python: Path) -> None:
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import msgpack, markupsafe;"
        "assert msgpack.Packer.__module__ == 'msgpack.fallback', msgpack.Packer;"
        "assert markupsafe.escape.__module__ == 'markupsafe', markupsafe.escape;"
        "assert markupsafe._escape_inner.__module__ == 'markupsafe._native', markupsafe._escape_inner;"
        "assert msgpack.unpackb(msgpack.packb({'a': b'x'})) == {'a': b'x'}"
    )
    result = subprocess.run([bare_python, "-c", check, pyz], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def native_check(python: Path, pyz: Path, **env: str) -> dict:
    """Run NATIVE_CHECK with the zipapp (``env`` added to the environment); its report."""
    result = subprocess.run(
        [python, "-c", NATIVE_CHECK, pyz],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def native_folder(pyz: Path, cache: Path) -> Path:
    with zipfile.ZipFile(pyz) as zf:
        return cache / "trio_dht" / f"native-{json.loads(zf.read(native.MANIFEST))['hash']}"


def extension(folder: Path, distribution: str) -> Path:
    """The C extension of ``distribution`` (a key of NATIVE_EXTENSIONS) under ``folder``."""
    (path,) = folder.glob(f"{NATIVE_EXTENSIONS[distribution]}.*")
    return path


def rewritten(pyz: Path, output: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A copy of ``pyz`` at ``output`` with each file's data ``change(zip path, data)``."""
    with zipfile.ZipFile(pyz) as source, zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as copy:
        for info in source.infolist():
            copy.writestr(info, change(info.filename, source.read(info)))
    return output


def retagged(pyz: Path, tmp_path: Path) -> Path:
    """A copy of ``pyz`` whose native code claims to be built for another interpreter."""

    def change(name: str, data: bytes) -> bytes:
        if name == native.MANIFEST:
            return json.dumps({**json.loads(data), "tag": "cpython-399-plan9-mips.so"}).encode()
        return data

    return rewritten(pyz, tmp_path / "other.pyz", change)


def with_broken_extension(pyz: Path, tmp_path: Path, distribution: str) -> Path:
    """A copy of ``pyz`` whose C extension of ``distribution`` is no shared object, its manifest to match."""
    with zipfile.ZipFile(pyz) as zf:
        old = json.loads(zf.read(native.MANIFEST))
        files = {name: zf.read(f"{native.FOLDER}/{name}") for name in old["files"]}
    (broken,) = [name for name in files if name.startswith(f"{NATIVE_EXTENSIONS[distribution]}.")]
    files[broken] = b"not a shared object"
    manifest = json.dumps(native.manifest(old["tag"], old["packages"], files)).encode()

    def change(name: str, data: bytes) -> bytes:
        if name == native.MANIFEST:
            return manifest
        return files[broken] if name == f"{native.FOLDER}/{broken}" else data

    return rewritten(pyz, tmp_path / f"broken-{distribution}.pyz", change)


def test_pyz_extracts_the_native_packages_once_and_uses_them(
    pyz: Path, bare_python: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # the zip's own .pyc files are used
    folder = native_folder(pyz, cache_home)
    result = subprocess.run([bare_python, pyz, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert os.listdir(cache_home / "trio_dht") == [folder.name]  # the entry point extracted it
    first = {name: extension(folder, name).stat() for name in NATIVE_EXTENSIONS}
    report = native_check(bare_python, pyz)
    assert report == {
        "loaded": {name: str(folder / name) for name in ("msgpack", "cffi", "cryptography")},
        "pure": False,
        "msgpack": str(folder / "msgpack" / "msgpack" / "__init__.py"),
        "roundtrip": True,
        "cryptography": str(folder / "cryptography" / "cryptography" / "__init__.py"),
    }
    assert {name: extension(folder, name).stat() for name in NATIVE_EXTENSIONS} == first  # not written again
    assert os.listdir(cache_home / "trio_dht") == [folder.name]
    with zipfile.ZipFile(pyz) as zf:
        files = json.loads(zf.read(native.MANIFEST))["files"]
    cached = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert cached == set(files)  # no bytecode written beside them: each file is checked against its hash


def test_pyz_processes_starting_together_extract_once(pyz: Path, bare_python: Path, cache_home: Path) -> None:
    processes = [
        subprocess.Popen([bare_python, pyz, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out.startswith(b"trio-dht ")
    assert os.listdir(cache_home / "trio_dht") == [native_folder(pyz, cache_home).name]  # no partial copies
    report = native_check(bare_python, pyz)
    assert report["pure"] is False and report["cryptography"] is not None


def test_pyz_rewrites_a_corrupted_cache_file_before_loading_it(
    pyz: Path, bare_python: Path, cache_home: Path
) -> None:
    folder = native_folder(pyz, cache_home)
    assert len(native_check(bare_python, pyz)["loaded"]) == len(NATIVE_EXTENSIONS)
    with zipfile.ZipFile(pyz) as zf:
        expected = {
            name: zf.read(f"{native.FOLDER}/{name}") for name in json.loads(zf.read(native.MANIFEST))["files"]
        }
    rust, module = extension(folder, "cryptography"), folder / "msgpack" / "msgpack" / "__init__.py"
    rust.write_bytes(b"not a shared object")  # would fail to import: no cryptography
    module.write_text("raise SystemExit('the corrupted copy was imported')\n")
    pyc = module.parent / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
    pyc.write_bytes(pyc.read_bytes()[:16] + b"not bytecode")
    extension(folder, "cffi").unlink()
    report = native_check(bare_python, pyz)
    assert report["loaded"] == {name: str(folder / name) for name in ("msgpack", "cffi", "cryptography")}
    assert (report["pure"], report["roundtrip"]) == (False, True)
    assert report["cryptography"] == str(folder / "cryptography" / "cryptography" / "__init__.py")
    for name, data in expected.items():
        assert (folder / name).read_bytes() == data, name
    assert os.listdir(cache_home / "trio_dht") == [folder.name]
    assert not [n for n in os.listdir(rust.parent) if n.startswith(".")]  # no temporary file left


def test_pyz_falls_back_to_pure_msgpack_when_turned_off(
    pyz: Path, bare_python: Path, cache_home: Path
) -> None:
    report = native_check(bare_python, pyz, TRIO_DHT_NATIVE="0")
    assert report["loaded"] == {}
    assert report["pure"] is True
    assert report["msgpack"].startswith(f"{pyz}/msgpack/__init__.py")  # .py or .pyc, in the zip
    assert report["roundtrip"] is True
    assert report["cryptography"] is None
    assert not cache_home.exists()


def test_pyz_falls_back_to_pure_msgpack_when_the_cache_is_unwritable(
    pyz: Path, bare_python: Path, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")  # (chmod would not stop root)
    report = native_check(bare_python, pyz, XDG_CACHE_HOME=str(not_a_folder / "cache"))
    assert (report["loaded"], report["pure"], report["roundtrip"], report["cryptography"]) == (
        {},
        True,
        True,
        None,
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(not_a_folder / "cache")}
    result = subprocess.run(
        [bare_python, pyz, "--version"], capture_output=True, text=True, timeout=60, env=env
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_pyz_falls_back_to_pure_msgpack_when_the_extension_fails_to_load(
    pyz: Path, bare_python: Path, cache_home: Path, tmp_path: Path
) -> None:
    broken = with_broken_extension(pyz, tmp_path, "msgpack")
    folder = native_folder(broken, cache_home)
    report = native_check(bare_python, broken)
    assert extension(folder, "msgpack").read_bytes() == b"not a shared object"  # extracted as the zip has it
    assert report["loaded"] == {name: str(folder / name) for name in ("cffi", "cryptography")}
    assert (report["pure"], report["roundtrip"]) == (True, True)
    assert report["msgpack"].startswith(f"{broken}/msgpack/__init__.py")  # .py or .pyc, in the zip
    assert report["cryptography"] == str(folder / "cryptography" / "cryptography" / "__init__.py")


def test_pyz_has_no_cryptography_when_its_extension_fails_to_load(
    pyz: Path, bare_python: Path, cache_home: Path, tmp_path: Path
) -> None:
    broken = with_broken_extension(pyz, tmp_path, "cryptography")
    folder = native_folder(broken, cache_home)
    report = native_check(bare_python, broken)
    assert report["loaded"] == {name: str(folder / name) for name in ("msgpack", "cffi")}
    assert (report["pure"], report["roundtrip"], report["cryptography"]) == (False, True, None)
    result = subprocess.run(
        [bare_python, broken, "-i", *LOOPBACK_NODE, "--no-proxy"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "an identity needs the cryptography package" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_pyz_falls_back_to_pure_msgpack_on_another_python(
    pyz: Path, bare_python: Path, cache_home: Path, tmp_path: Path
) -> None:
    report = native_check(bare_python, retagged(pyz, tmp_path))
    assert (report["loaded"], report["pure"], report["roundtrip"], report["cryptography"]) == (
        {},
        True,
        True,
        None,
    )
    assert not cache_home.exists()


def test_extract_keeps_the_copy_another_process_renamed_first(tmp_path: Path) -> None:
    folder = tmp_path / "trio_dht" / "native-0123"
    (folder / "msgpack").mkdir(parents=True)
    (folder / "msgpack" / "__init__.py").write_text("first")
    native.extract({"msgpack/__init__.py": b"second"}.__getitem__, ["msgpack/__init__.py"], folder)
    assert (folder / "msgpack" / "__init__.py").read_text() == "first"
    assert os.listdir(folder.parent) == [folder.name]
    shutil.rmtree(folder)
    native.extract({"msgpack/__init__.py": b"second"}.__getitem__, ["msgpack/__init__.py"], folder)
    assert (folder / "msgpack" / "__init__.py").read_text() == "second"
    assert os.listdir(folder.parent) == [folder.name]


def test_repair_rewrites_only_the_files_that_differ_from_their_hash(tmp_path: Path) -> None:
    files = {"a/same.py": b"same", "a/changed.so": b"right", "b/missing.py": b"back"}
    hashes = {name: native.file_hash(data) for name, data in files.items()}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "same.py").write_bytes(b"same")
    (tmp_path / "a" / "changed.so").write_bytes(b"wrong")
    same = (tmp_path / "a" / "same.py").stat()
    assert native.repair(files.__getitem__, hashes, tmp_path) == ["a/changed.so", "b/missing.py"]
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert (tmp_path / "a" / "same.py").stat() == same
    assert sorted(os.listdir(tmp_path / "a")) == ["changed.so", "same.py"]  # no temporary file left
    assert native.repair(files.__getitem__, hashes, tmp_path) == []
    # A file the manifest does not list (a module that would be imported before ours) is deleted.
    (tmp_path / "a" / "trio.py").write_bytes(b"raise SystemExit('planted')")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.cpython-311-x86_64-linux-gnu.so").write_bytes(b"planted")
    assert native.repair(files.__getitem__, hashes, tmp_path) == [
        "a/trio.py",
        "c/x.cpython-311-x86_64-linux-gnu.so",
    ]
    assert not (tmp_path / "a" / "trio.py").exists() and os.listdir(tmp_path / "c") == []
    (tmp_path / "a" / "__pycache__").mkdir()  # what python -O compiles there itself is left alone
    (tmp_path / "a" / "__pycache__" / "same.cpython-311.opt-1.pyc").write_bytes(b"compiled")
    assert native.repair(files.__getitem__, hashes, tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="user ids")
def test_the_cache_is_used_only_when_private_to_this_user(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    assert native._private(mine) and (mine.stat().st_mode & 0o777) == 0o700  # created private
    mine.chmod(0o777)
    assert native._private(mine) and not mine.stat().st_mode & 0o022  # ours: made private again
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert native._private(link)  # a link to a directory of ours (a ~/.cache kept elsewhere)
    if os.getuid() == 0:  # as root (CI), a folder owned by someone else can be made
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 12345, 12345)
        assert not native._private(theirs)


def test_every_module_imports_and_the_crypto_works_from_the_pyz(pyz: Path, bare_python: Path) -> None:
    owner = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed = crypto.sign_value(owner, Value(b"signed", type=3, id=5, seq=1))
    ua_key, auth = webpush_crypto.generate_private_key(), bytes(range(16))
    args = [signed.packed().hex(), webpush_crypto.public_bytes(ua_key).hex(), auth.hex()]
    result = subprocess.run(
        [bare_python, "-c", IMPORT_ALL, pyz, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["failed"].keys() == NOT_IN_ZIPAPP, report["failed"]
    assert report["backends"] == ["purecrypto", "purecrypto"]
    assert report["verified"] is True
    assert report["tampered_verified"] is False
    body = bytes.fromhex(report["webpush"])
    assert webpush_crypto.backend is webpush_crypto.CRYPTOGRAPHY  # decrypted here by the other backend
    assert webpush_crypto.decrypt(body, ua_key, auth) == b"pushed from the zipapp"


async def test_pyz_serves_on_a_bare_python_and_stops_on_sigterm(
    pyz: Path, bare_python: Path, cache_home: Path
) -> None:
    proxy_port = free_tcp_port()
    flags = [*LOOPBACK_NODE, "--proxy-addr", "127.0.0.1", "--proxyserver", str(proxy_port)]
    async with trio_dht_process([bare_python, pyz, *flags]) as node:
        assert node.process.returncode is None, node.output
        reply = await ping(node.udp_port)
        assert reply["r"]["id"].hex() == node.node_id
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                response = await client.get(f"http://127.0.0.1:{proxy_port}/")
            except httpx.HTTPError as exc:
                pytest.fail(f"GET / failed: {exc!r}; the program said:\n{node.output}")
        assert response.status_code == 200
        assert response.json()["node_id"] == node.node_id
        assert f"proxy on http://127.0.0.1:{proxy_port}" in node.output
        assert await node.stop() == 0
    assert "Traceback" not in node.output
    assert native_folder(pyz, cache_home).is_dir()  # with msgpack's C extension


async def test_pyz_serves_metrics_healthz_and_status_on_a_bare_python(pyz: Path, bare_python: Path) -> None:
    """prometheus_client is carried: ``/metrics`` parses, ``/healthz`` answers (a lone node: 503 once the
    threshold passed), also through an HTTP worker; the status page is carried and served from the zip.
    (Read without prometheus_client: this test's process must not need what only the zipapp carries.)"""
    port = free_tcp_port()
    command = [bare_python, pyz, *LOOPBACK_NODE, "--proxyserver", str(port), "--proxy-addr", "127.0.0.1",
               "--http-workers", "1", "--health-isolated-after", "0.5"]  # fmt: skip
    async with (
        trio_dht_process(command, timeout=60) as node,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http,
    ):
        assert node.process.returncode is None, node.output
        r = await http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        types = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE ")}
        assert {"trio_dht_nodes", "trio_dht_http_requests_total", "process_cpu_seconds_total"} <= types
        r = await http.get("/status")
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        assert (
            '<canvas id="peers-chart">' in r.text
            and "script-src 'sha256-" in r.headers["content-security-policy"]
        )
        await trio.sleep(0.6)
        r = await http.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy", r.text
        assert await node.stop() == 0
    assert "Traceback" not in node.output

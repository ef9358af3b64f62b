"""The README's two set-up commands: the test command is the one CI runs; the build script exists."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    """The lines of the README's first code block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def test_readme_starts_with_two_commands() -> None:
    build_and_run, test = setup_commands()
    assert build_and_run == "python3 zipapp/build.py && python3 dist/trio_dht.pyz"
    assert test.startswith("python3 -m venv .venv && ")
    assert (ROOT / "zipapp" / "build.py").is_file()


def test_ci_runs_the_readme_test_command() -> None:
    test = setup_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert f"{test} || exit $?" in ci_lines

"""``trio_dht.limits``: the budgets, ``--limit NAME=VALUE`` and ``--limits``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from trio_dht.cli import parse_args
from trio_dht.limits import DEFAULT, Limits, parse_seconds, parse_size


def test_sizes_and_durations_parse_in_the_command_line_forms() -> None:
    assert [parse_size(t) for t in ("1000", "64K", "4M", "1g", "16MiB", "2kb")] == [
        1000,
        65536,
        4 << 20,
        1 << 30,
        16 << 20,
        2048,
    ]
    assert [parse_seconds(t) for t in ("10", "2.5", "30s", "2m", "1h", "500ms")] == [
        10.0,
        2.5,
        30.0,
        120.0,
        3600.0,
        0.5,
    ]
    for bad in ("", "-1", "1.5K", "4T", "ten"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("", "-1", "1d2", "soon"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_replace_applies_assignments_and_names_the_bad_one() -> None:
    changed = DEFAULT.replace(["http_head_timeout=2s", "udp-reassembly-bytes=4M", "push_concurrency=3"])
    assert (changed.http_head_timeout, changed.udp_reassembly_bytes, changed.push_concurrency) == (
        2.0,
        4 << 20,
        3,
    )
    assert (
        dataclasses.replace(
            changed, http_head_timeout=10.0, udp_reassembly_bytes=16 << 20, push_concurrency=16
        )
        == DEFAULT
    )
    with pytest.raises(ValueError, match="unknown limit 'nope=1'"):
        DEFAULT.replace(["nope=1"])
    with pytest.raises(ValueError, match="unknown limit"):
        DEFAULT.replace(["http_head_timeout"])
    with pytest.raises(ValueError, match="must be positive"):
        DEFAULT.replace(["http_head_timeout=0"])
    with pytest.raises(ValueError, match="not a size"):
        DEFAULT.replace(["push_queue=lots"])


def test_every_limit_is_positive_and_documented() -> None:
    rows = DEFAULT.describe()
    assert [name for name, _, _ in rows] == [f.name for f in dataclasses.fields(Limits)]
    for name, shown, doc in rows:
        assert doc, f"{name} has no docstring"
        assert DEFAULT.replace([f"{name}={shown}"]) == DEFAULT, name  # what --limits shows parses back


def test_the_command_line_carries_limits_and_refuses_bad_ones() -> None:
    assert parse_args(["--limit", "http_send_buffer=1M"]).limits.http_send_buffer == 1 << 20
    assert parse_args([]).limits == DEFAULT
    bad = subprocess.run(
        [sys.executable, "-m", "trio_dht", "--limit", "http_head_timeout=-3"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--limit" in bad.stderr
    listed = subprocess.run([sys.executable, "-m", "trio_dht", "--limits"], capture_output=True, text=True)
    assert listed.returncode == 0 and "http_head_timeout=10s" in listed.stdout

"""``bench/run.py --quick`` completes and writes well-formed results (never a timing assertion)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: One summary row per workload starts with each of these: every workload runs in the quick run too.
WORKLOADS = (
    "UDP ping answered",
    "UDP get answered",
    "UDP put answered",
    "UDP signed puts accepted",
    "UDP signed put: server CPU per verify",
    "UDP get of a signed value answered",
    "GET /key/{h}",
    "POST distinct keys",
    "GET /node/info",
    "SUBSCRIBE distinct keys",
    "memory per subscription",
    "put -> push latency",
    "push throughput, a POST",
    "push throughput, a DHT put",
    "proxy client get",
    "listen fan-out",
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_quick_benchmark_run_writes_results(tmp_path: Path) -> None:
    missing = [tool for tool in ("dhtnode", "wrk") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {missing} for the benchmark smoke run")
        pytest.skip(f"needs {missing} (apt-get install dhtnode wrk)")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output-dir", str(tmp_path)],
        check=True,
        cwd=ROOT,
        timeout=900,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) >= 19
    for row in rows:
        assert set(row) >= {"workload", "unit", "dhtnode", "trio_dht", "ratio"}
        assert row["dhtnode"] > 0 and row["trio_dht"] > 0, row  # a workload that ran and was answered
    for workload in WORKLOADS:
        assert any(row["workload"].startswith(workload) for row in rows), workload
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results")
    assert "| workload | unit | dhtnode | trio_dht | ratio |" in text
    assert text.count("\n| ") >= len(rows)
    providers = results["provider_rows"]  # ours only: through FCM and APNs against our gorush path
    assert [row["workload"].split(" (")[0] for row in providers] == [
        "push throughput through the FCM double, a DHT put per subscribed key",
        "push throughput through the APNs double, a DHT put per subscribed key",
        "memory per open FCM connection",
        "memory per open APNs connection",
    ]
    assert all(row["direct"] > 0 for row in providers[:2]), providers  # pushes/s; memory may round to 0
    assert "| workload | unit | our gorush path | trio_dht direct | ratio |" in text
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_a_repeated_scenario_reports_its_median_run_and_every_figure() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from push_bench import median_run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    runs = [{"rps": 3.0, "p99": 9.0}, {"rps": 1.0, "p99": 8.0}, {"rps": 2.0, "p99": 7.0}]
    assert median_run(runs, "rps") == {"rps": 2.0, "p99": 7.0, "runs": [3.0, 1.0, 2.0]}
    assert median_run(runs[:2], "rps")["rps"] == 1.0  # of an even count, the lower middle
    assert median_run(runs[:1], "rps") is runs[0]
    assert median_run(runs, None) is runs[0]  # a scenario that runs once


def test_signed_bench_smoke_run_verifies_every_put(tmp_path: Path) -> None:
    """``bench/signed_bench.py --quick``: both servers accept the signed puts and answer the gets with the
    values put, and every put to ours costs a verify (no verify-cache hit)."""
    if shutil.which("dhtnode") is None:
        pytest.skip("needs dhtnode (apt-get install dhtnode)")
    pytest.importorskip("cryptography")
    output = tmp_path / "signed.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "signed_bench.py"), "--quick", "--output", str(output)],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    data = json.loads(output.read_text())
    for kind in ("dhtnode", "trio_dht"):
        for method in ("signed-put", "signed-get"):
            run = data["results"][kind][method]
            assert run["replies"] > 0 and run["errors"] == 0, (kind, run)
    assert data["results"]["trio_dht"]["verify_cache_hits"] == 0
    assert "| signed put accepted (one verify each) |" in data["table"]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from run import signed_rows
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = signed_rows(data)  # what bench/run.py puts in its summary
    assert [row.workload.split(" (")[0] for row in rows if row.unit == "req/s"] == [
        "UDP signed puts accepted by one node",
        "UDP get of a signed value answered by one node",
    ]
    assert all(row.dhtnode > 0 and row.trio_dht > 0 for row in rows)


def test_provider_bench_smoke_run_pushes_through_every_provider(tmp_path: Path) -> None:
    """``bench/provider_bench.py --quick``: every subscribed key's push reaches the gorush, FCM and APNs
    doubles exactly once, each FCM/APNs app over its own connection, and the memory per connection is
    measured."""
    if shutil.which("dhtnode") is None:
        pytest.skip("needs dhtnode (apt-get install dhtnode)")
    pytest.importorskip("cryptography")
    output = tmp_path / "providers.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "provider_bench.py"), "--quick", "--output", str(output)],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    data = json.loads(output.read_text())
    for kind, platform in (("gorush", "android"), ("fcm", "android"), ("apns", "ios")):
        result = data["results"][kind]
        flood = result["dhtflood"]
        assert result["platform"] == platform
        assert flood["pushes"] == flood["distinct_keys"] == result["keys"] == 1_000, (kind, flood)
        assert flood["push_rate"] > 0
        connection = result["connection"]
        assert connection["rss_before_mb"] > 0
        if kind == "gorush":
            assert flood["gorush_requests"] <= flood["pushes"]  # gorush takes several pushes a request
        else:
            assert flood["gorush_requests"] == flood["pushes"]  # one request per push
            assert connection["apps"] == 2
            # one HTTP/2 connection per app for its pushes; FCM asks for its token on one more, closed after
            assert connection["connections"] == (4 if kind == "fcm" else 2)
            assert "kb_per_connection" in connection
    assert "| **pushes/s**, one value over the DHT per subscribed key |" in data["table"]
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from run import provider_rows
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = provider_rows(data)  # what bench/run.py puts in its summary
    assert [row.unit for row in rows] == ["pushes/s", "pushes/s", "KB", "KB"]
    assert all(row.gorush_path > 0 for row in rows[:2])

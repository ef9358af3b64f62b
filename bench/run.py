"""Every benchmark, ours against Debian's ``dhtnode`` 2.4.12, in one run: ``bench/RESULTS.md`` and a chart.

Our side is the zipapp (``dist/trio_dht.pyz``, built afresh first), started the way users start it; the
other side is ``dhtnode`` with the same flags. Each suite uses one load client and one gateway double for both
servers:

* ``udp_bench.py``: UDP ping / get / put answered per second by one node (16 loopback source addresses);
* ``signed_bench.py``: puts of 4096-bit signed values a storing node accepts per second (one RSA verify each)
  and its CPU per verify, and gets of signed values it answers per second;
* ``proxy_bench.py``: REST proxy GET one value, POST distinct keys, GET /node/info (wrk, 32 connections);
* ``push_bench.py``: SUBSCRIBE distinct keys, memory per subscription, put -> push latency, push throughput;
* ``client_bench.py``: proxy-client ``get`` round trips and listen fan-out to 1 000 streams;
* ``provider_bench.py`` (ours only, in a table of its own): pushes/s through the FCM and the APNs doubles
  against our gorush path, and memory per open provider connection.

    python bench/run.py            # the full run, about 12 minutes on 2 cores; rewrites bench/RESULTS.md
    python bench/run.py --quick    # a ~1-minute smoke run into bench/quick/ (what CI runs)

``--quick`` exercises every workload with shorter runs and smaller counts, and starts the servers of a suite
together, reusing one stack per server for all its scenarios (the full run starts a fresh stack for each);
its figures are a smoke test, not comparable to the full run's.

The summary table gives each workload's figure for both servers and the ratio trio_dht / dhtnode, oriented
so that above 1 means we do better (for latencies and memory the ratio is dhtnode / ours).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYZ = ROOT / "dist" / "trio_dht.pyz"


@dataclass
class Row:
    """One workload of the summary."""

    workload: str
    unit: str
    dhtnode: float
    trio_dht: float
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        """Above 1: we do better."""
        if not self.dhtnode or not self.trio_dht:
            return float("nan")
        return self.trio_dht / self.dhtnode if self.higher_is_better else self.dhtnode / self.trio_dht


@dataclass
class ProviderRow:
    """One workload of the direct push providers: ours through FCM or APNs against our gorush path."""

    workload: str
    unit: str
    gorush_path: float
    direct: float

    @property
    def ratio(self) -> float:
        """Above 1: the direct provider does better than the gorush path."""
        return self.direct / self.gorush_path if self.gorush_path and self.direct else float("nan")


def run_suite(script: str, args: list[str], output: Path, env: dict[str, str], timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / script), *args, "--output", str(output)]
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env, timeout=timeout, cwd=ROOT)
    return json.loads(output.read_text())


def udp_rows(data: dict) -> list[Row]:
    """With rate limits off (``-U``): with OpenDHT's defaults both are capped near 8 k requests/s."""
    d, o = data["results"]["dhtnode -U"], data["results"]["trio_dht -U"]
    rows = [Row(f"UDP {m} answered by one node (limits off)", "req/s", d[m]["rps"], o[m]["rps"]) for m in d]
    rows += [
        Row(f"UDP {m}: server CPU per request", "µs", d[m]["cpu_us_per_req"], o[m]["cpu_us_per_req"], False)
        for m in d
    ]
    return rows


def signed_rows(data: dict) -> list[Row]:
    """Limits off (``-U``); every put a value the node has not seen, so one RSA verify each."""
    d, o = data["results"]["dhtnode"], data["results"]["trio_dht"]
    put, get = "signed-put", "signed-get"
    return [
        Row("UDP signed puts accepted by one node (4096-bit RSA)", "req/s", d[put]["rps"], o[put]["rps"]),
        Row(
            "UDP signed put: server CPU per verify",
            "µs",
            d[put]["cpu_us_per_req"],
            o[put]["cpu_us_per_req"],
            False,
        ),
        Row("UDP get of a signed value answered by one node", "req/s", d[get]["rps"], o[get]["rps"]),
        Row(
            "UDP get of a signed value: server CPU per get",
            "µs",
            d[get]["cpu_us_per_req"],
            o[get]["cpu_us_per_req"],
            False,
        ),
    ]


def proxy_rows(data: dict) -> list[Row]:
    r = data["results"]
    names = {"get": "GET /key/{h}, one value", "post": "POST distinct keys", "info": "GET /node/info"}
    rows = []
    for sc, label in names.items():
        d, o = r["dhtnode"][sc], r["trio_dht"][sc]
        rows.append(Row(f"{label} (32 conns)", "req/s", d["rps"], o["rps"]))
        rows.append(Row(f"{label}: p99 latency", "ms", d["p99"], o["p99"], higher_is_better=False))
    return rows


def push_rows(data: dict) -> list[Row]:
    r = data["results"]
    d, o = r["dhtnode"], r["trio_dht"]
    rows = [Row("SUBSCRIBE distinct keys (32 conns)", "req/s", d["rate"]["rps"], o["rate"]["rps"])]
    for n in d["memory"]["milestones"]:
        rows.append(
            Row(
                f"memory per subscription at {int(n):,}",
                "KB",
                d["memory"]["milestones"][n]["kb_per_sub"],
                o["memory"]["milestones"][n]["kb_per_sub"],
                higher_is_better=False,
            )
        )
    rows.append(Row("put -> push latency p50", "ms", d["latency"]["p50"], o["latency"]["p50"], False))
    rows.append(Row("put -> push latency p99", "ms", d["latency"]["p99"], o["latency"]["p99"], False))
    for scenario, how in (("flood", "a POST"), ("dhtflood", "a DHT put")):
        if scenario in d and scenario in o:
            rows.append(
                Row(
                    f"push throughput, {how} per subscribed key",
                    "pushes/s",
                    d[scenario]["push_rate"],
                    o[scenario]["push_rate"],
                )
            )
    return rows


def client_rows(data: dict) -> list[Row]:
    r = data["results"]
    d, o = r["dhtnode"], r["trio_dht"]
    n = o["fanout"]["streams"]
    return [
        Row("proxy client get round trips (8 callers)", "req/s", d["get"]["rps"], o["get"]["rps"]),
        Row(
            f"listen fan-out: one put to {n} streams, last one",
            "ms",
            d["fanout"]["last_ms"],
            o["fanout"]["last_ms"],
            higher_is_better=False,
        ),
    ]


def provider_rows(data: dict) -> list[ProviderRow]:
    r = data["results"]
    gorush = r["gorush"]["dhtflood"]["push_rate"]
    rows = [
        ProviderRow(
            f"push throughput through the {name} double, a DHT put per subscribed key",
            "pushes/s",
            gorush,
            r[kind]["dhtflood"]["push_rate"],
        )
        for kind, name in (("fcm", "FCM"), ("apns", "APNs"))
    ]
    for kind, name in (("fcm", "FCM"), ("apns", "APNs")):
        rows.append(
            ProviderRow(
                f"memory per open {name} connection (VmRSS growth)",
                "KB",
                float("nan"),
                r[kind]["connection"]["kb_per_connection"],
            )
        )
    return rows


def provider_table(rows: list[ProviderRow]) -> list[str]:
    lines = [
        "Direct push providers, ours only (dhtnode pushes through gorush alone): ratio above 1 means the "
        "direct provider does better than our gorush path.",
        "",
        "| workload | unit | our gorush path | trio_dht direct | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        base = f"{r.gorush_path:,.2f}" if r.gorush_path == r.gorush_path else "-"
        ratio = f"**{r.ratio:.2f}**" if r.ratio == r.ratio else "-"
        lines.append(f"| {r.workload} | {r.unit} | {base} | {r.direct:,.2f} | {ratio} |")
    return lines


def markdown(
    rows: list[Row],
    details: dict[str, str],
    command: str,
    started: str,
    elapsed: float,
    providers: list[ProviderRow] | None = None,
) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine()}.",
        f"Command: `{command}` ({started}, {elapsed / 60:.1f} min). Our side: `python dist/trio_dht.pyz`; "
        "the other: Debian's `dhtnode` 2.4.12. Both on loopback, with the same load clients and gateway "
        "double, in this one run; the machine's 2 cores are shared by servers, clients and any other tenant, "
        "so compare ratios, not absolute figures.",
        "",
        "Ratio: above 1 means trio_dht does better (trio_dht / dhtnode for rates, dhtnode / trio_dht for "
        "latencies, CPU and memory).",
        "",
        "| workload | unit | dhtnode | trio_dht | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.unit} | {r.dhtnode:,.2f} | {r.trio_dht:,.2f} | **{r.ratio:.2f}** |"
        )
    if providers:
        lines += ["", *provider_table(providers)]
    lines += ["", "![ratios per workload](results.png)", ""]
    for title, text in details.items():
        lines += [f"## {title}", "", text, ""]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path, title: str) -> None:
    """Grouped bars per workload: dhtnode at 1.0, ours at its ratio (above 1 = better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.6))
    ys = range(len(rows))
    ratios = [r.ratio if r.ratio == r.ratio else 0 for r in rows]
    ax.barh(
        [y + 0.2 for y in ys], [1.0] * len(rows), height=0.4, label="dhtnode 2.4.12 (= 1)", color="#9aa5b1"
    )
    ax.barh([y - 0.2 for y in ys], ratios, height=0.4, label="trio_dht", color="#2b7bb9")
    for y, ratio in zip(ys, ratios, strict=True):
        ax.text(ratio + 0.02, y - 0.2, f"{ratio:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{r.workload} ({r.unit})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("relative performance, dhtnode = 1 (higher is better for trio_dht)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke run")
    ap.add_argument("--output-dir", type=Path, help="default: bench/ (full run) or bench/quick/ (--quick)")
    args = ap.parse_args()
    out = args.output_dir or (HERE / "quick" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "zipapp" / "build.py")], check=True, cwd=ROOT)
    env = {**os.environ, "TRIO_DHT_CMD": shlex.join([sys.executable, str(PYZ)])}
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    quick = ["--quick"] if args.quick else []
    suites = [
        ("UDP node", "udp_bench.py", quick, udp_rows),
        ("Signed values", "signed_bench.py", quick, signed_rows),
        ("REST proxy", "proxy_bench.py", [*quick, "--no-write"], proxy_rows),
        ("Push notifications", "push_bench.py", [*quick, "--no-write"], push_rows),
        ("Proxy client", "client_bench.py", quick, client_rows),
        ("Direct push providers (ours only)", "provider_bench.py", [*quick, "--no-write"], provider_rows),
    ]
    rows: list[Row] = []
    providers: list[ProviderRow] = []
    details: dict[str, str] = {}
    raw: dict[str, dict] = {}
    for title, script, extra, to_rows in suites:
        data = run_suite(script, extra, out / f"{Path(script).stem}.json", env, timeout=900)
        raw[script] = data
        for row in to_rows(data):
            (providers if isinstance(row, ProviderRow) else rows).append(row)
        details[title] = data.get("table", "")
    elapsed = time.monotonic() - t0
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    (out / "RESULTS.md").write_text(markdown(rows, details, command, started, elapsed, providers))
    (out / "results.json").write_text(
        json.dumps(
            {
                "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                "provider_rows": [asdict(r) | {"ratio": r.ratio} for r in providers],
                "suites": raw,
            },
            indent=1,
        )
    )
    chart(rows, out / "results.png", f"trio_dht vs dhtnode 2.4.12 — {machine().split(',')[0]}, {started}")
    print(f"wrote {out / 'RESULTS.md'} and {out / 'results.png'} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()

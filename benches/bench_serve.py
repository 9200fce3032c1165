"""``patchrec serve`` under load: requests/s and p50/p99 latency with dynamic batching on vs off, at 1, 8 and
32 concurrent clients, for SASRec + PerSRec (rolling layout) and the demo's tiny LLM (PFT-I and vanilla).

One command (it makes what it needs: a SASRec + PerSRec directory with random weights, which do not change
the cost, and ``patchrec demo --quick`` unless ``--demo DIR`` points at a finished demo)::

    python benches/bench_serve.py --out benches/results/serve-cpu

Every point is a fresh server process (``python -m patchrec serve``, one torch thread) on 127.0.0.1 and the
closed-loop clients of ``patchrec.serve.loadgen`` (half events, half recommendations, seeded), in the same
process as this script: client and server share the machine's cores. Rounds interleave batching off and on
for each model, so both see the same background load; the load average is recorded before and after every
point. Every point also checks that each acknowledged event was stored exactly once and that no request
failed. ``--out DIR`` gets ``serve.json`` (the command, the settings and every point) and ``summary.md``
(``patchrec.reports.serve_tables``: medians over rounds, and on / off ratios measured in the same round).

``pytest benches/bench_serve.py`` runs the full load test instead: 32 clients x 50 requests on SASRec +
PerSRec, no errors, every acknowledged event stored exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from patchrec.baselines import SASRec, SASRecConfig
from patchrec.baselines.checkpoint import save_baseline
from patchrec.reports.serve_tables import serve_ratios, serve_summary, serve_table
from patchrec.serve.loadgen import LoadConfig, run_load

SASREC_ITEMS = 3706  # ML-1M's catalog
SASREC = SASRecConfig(hidden=64, num_blocks=2, num_heads=1, dropout=0.0, max_len=200, persrec_tokens=4,
                      persrec_segment=50, persrec_layout="rolling")  # fmt: skip
BATCHING = {"off": ["--batch-requests", "1"], "on": ["--batch-window-ms", "5", "--batch-requests", "64"]}


def make_sasrec(root: Path) -> Path:
    out = root / "sasrec-persrec-rolling"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = SASRec(SASREC_ITEMS, SASREC)
        config = {"model": "sasrec", "num_items": SASREC_ITEMS, "max_items": SASREC.max_len,
                  "model_config": dataclasses.asdict(SASREC), "weights": "random"}  # fmt: skip
        save_baseline(model, config, out)
    return out


def make_demo(root: Path) -> Path:
    out = root / "demo"
    if not (out / "pft-i" / "model").is_dir():
        command = [sys.executable, "-m", "patchrec", "demo", "--quick", "--out", str(out), "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


class Server:
    def __init__(self, model: Path, db: Path, flags: list[str]) -> None:
        for path in db.parent.glob(db.name + "*"):
            path.unlink()
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchrec", "serve", "--model", str(model), "--db", str(db), "--port", "0",
             "--threads", "1", "--queue-size", "1024", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for line in self.proc.stdout:
            if "ready on http://" in line:
                self.url = line.split("ready on ")[1].split()[0]
                break
        else:
            raise RuntimeError(f"server for {model} did not start")
        self.startup_s = time.perf_counter() - start
        # keep reading its output, so that a chatty server never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.db = db

    def stop(self) -> None:
        self.proc.terminate()
        if self.proc.wait(120) != 0:
            raise RuntimeError(f"server exited {self.proc.returncode}")


def batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("patchrec_batch_requests_count"), value("patchrec_batch_requests_sum")


def exactly_once(db: Path, acked: dict[str, list[int]]) -> bool:
    conn = sqlite3.connect(db)
    try:
        for user, items in acked.items():
            rows = conn.execute("SELECT item FROM events WHERE user_id = ? ORDER BY seq", (user,)).fetchall()
            if [r[0] for r in rows] != items:
                return False
    finally:
        conn.close()
    return True


def run_point(server: Server, num_items: int, clients: int, total: int, warm: int, seed: int) -> dict:
    config = LoadConfig(clients=clients, requests=max(2, total // clients), warm_items=warm, seed=seed)
    load_before = os.getloadavg()
    count_before, sum_before = batch_stats(server.url)
    result = asyncio.run(run_load(server.url, num_items, config, user_prefix=f"s{seed}-c{clients}"))
    count, total_sum = batch_stats(server.url)
    point = result.summary()
    point.update(clients=clients, requests_per_client=config.requests, loadavg_before=load_before,
                 loadavg_after=os.getloadavg(), exactly_once=exactly_once(server.db, result.acked),
                 batches=count - count_before,
                 mean_batch_requests=(total_sum - sum_before) / max(count - count_before, 1))  # fmt: skip
    return point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="result directory (serve.json, summary.md)")
    parser.add_argument("--demo", default=None,
                        help="a finished `patchrec demo --out DIR` (default: run the --quick demo)")
    parser.add_argument("--work", default=None, help="where models and databases go (default: a temp dir)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per point (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point (default 3)")
    parser.add_argument("--requests", type=int, default=320,
                        help="timed requests per point, split over the clients (default 320; LLM: half)")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        demo = Path(args.demo) if args.demo else make_demo(work)
        demo_items = len((demo / "data" / "id2title.txt").read_text().splitlines())
        models = {
            "sasrec+persrec (rolling)": (make_sasrec(work), SASREC_ITEMS, 100, args.requests),
            "llm pft-i": (demo / "pft-i", demo_items, 10, args.requests // 2),
            "llm vanilla": (demo / "vanilla", demo_items, 10, args.requests // 2),
        }
        points, startup = [], {}
        started = time.time()
        for round_ in range(args.rounds):
            for name, (path, num_items, warm, total) in models.items():
                for batching, flags in BATCHING.items():
                    server = Server(path, work / "bench.sqlite", flags)
                    startup.setdefault(name, []).append(server.startup_s)
                    try:
                        for c in clients:
                            point = run_point(server, num_items, c, total, warm, seed=round_)
                            point.update(model=name, batching=batching, round=round_)
                            points.append(point)
                            print(f"{name:26s} batching {batching:3s} clients {c:2d}: "
                                  f"{point['requests_per_s']:7.1f} req/s, p50 {point['p50_ms']:7.1f} ms, "
                                  f"p99 {point['p99_ms']:7.1f} ms, "
                                  f"{point['mean_batch_requests']:.2f} req/batch, "
                                  f"load {point['loadavg_before'][0]:.1f}", flush=True)  # fmt: skip
                    finally:
                        server.stop()
    summary = serve_summary(points)
    result = {
        "command": "python benches/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "note": "client and server share this machine's cores; server: one process, one torch thread; "
                "SASRec weights are random (the cost does not depend on them); "
                "LLM: patchrec demo's tiny models",
        "mix": {"events_share": 0.5, "k": 10, "users_per_client": 2},
        "sasrec_config": dataclasses.asdict(SASREC), "sasrec_items": SASREC_ITEMS,
        "batching": {k: " ".join(v) for k, v in BATCHING.items()},
        "startup_seconds": startup, "seconds": time.time() - started, "summary": summary, "points": points,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1) + "\n")
    tables = serve_table(summary) + "\n" + serve_ratios(points)
    (out / "summary.md").write_text(tables)
    print(tables)
    return 0


def test_full_load_32_clients(tmp_path):
    """The full load test: 32 clients x 50 requests (half events) on SASRec + PerSRec, no request fails,
    every acknowledged event stored exactly once."""
    server = Server(make_sasrec(tmp_path), tmp_path / "load.sqlite", BATCHING["on"])
    try:
        config = LoadConfig(clients=32, requests=50, warm_items=100, seed=0)
        result = asyncio.run(run_load(server.url, SASREC_ITEMS, config))
    finally:
        server.stop()
    summary = result.summary()
    print(f"\n32 clients: {summary['requests_per_s']:.1f} req/s, p50 {summary['p50_ms']:.1f} ms, "
          f"p99 {summary['p99_ms']:.1f} ms (client and server share the CPU)")
    assert result.errors == {} and result.ok == result.requests == 32 * 50
    assert exactly_once(server.db, result.acked)


if __name__ == "__main__":
    sys.exit(main())

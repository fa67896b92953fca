"""Disaggregated serving across two emulated hosts: prefill in one network namespace, decode in
the other, the link shaped with tc; the KV hand-off's rate against the shaping (needs root).

    python benchmarks/serve_netns.py --machine cpu2-vm --rates 100,300

For each rate: the server's prefill worker runs inside host 0, the decode worker inside host 1
(their transport engines bound to the namespaces' addresses), a closed-loop traffic of long
prompts and short outputs runs, and each request's KV hand-off is recorded (bytes, first
write → last completion). Writes benchmarks/results/serve-netns-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _busy(tx: list[dict]) -> float:
    """Seconds during which at least one KV hand-off was in flight on the link (the union of the
    requests' first-write → last-completion windows): the link's busy time, whatever the overlap."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted((t["t0"], t["t1"]) for t in tx):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machine", required=True)
    ap.add_argument("--rates", default="100,300", help="link rates in Mbit/s")
    ap.add_argument("--traffic", default="concurrency=2,isl=480,osl=4,requests=12")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    from transport.emulate import EmulatedCluster
    from workbench.serve import bench
    from workbench.serve.checkpoints import random_llama
    from workbench.serve.service import start_service

    model = Path("/tmp/wb-serve-netns")
    if not (model / "model.safetensors").is_file():   # KV of 8 KiB per token: a 480-token prompt moves 3.75 MiB
        random_llama(model, hidden=256, layers=8, heads=4, kv_heads=2, intermediate=512, dtype="float32")
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        with EmulatedCluster(hosts=2, rate_mbit=rate) as cl:
            spec = dict(num_pages=512, page_size=16, threads=1, lanes=2,
                        prefill={"netns": cl.ns(0), "transport_host": cl.ip(0)},
                        decode={"netns": cl.ns(1), "transport_host": cl.ip(1)})
            with start_service(model, "disaggregated", **spec) as svc:
                bench.run(svc.url, "concurrency=1,isl=32,osl=2,requests=2", progress=False, tokenizer=svc.app.tok)
                svc.backend.settle(10.0)   # the warm-up's hand-offs logged before the count is taken
                n0 = len(svc.backend.transfers)
                t0 = time.time()
                res = bench.run(svc.url, args.traffic, progress=False, tokenizer=svc.app.tok)
                svc.backend.settle(10.0)
                tx = list(svc.backend.transfers)[n0:]
                wall = time.time() - t0
        nbytes = sum(t["bytes"] for t in tx)
        windows = [t["t1"] - t["t0"] for t in tx]
        per = sorted(t["bytes"] / max(w, 1e-9) for t, w in zip(tx, windows))
        row = {"rate_mbit": rate, "shaped_MBps": rate / 8, "requests": res.metrics["completed"],
               "kv_bytes_per_request": nbytes / max(1, len(tx)),
               "kv_MBps_median": per[len(per) // 2] / 1e6 if per else 0.0,
               "kv_MBps_best": per[-1] / 1e6 if per else 0.0,
               "kv_MBps_over_windows": nbytes / max(sum(windows), 1e-9) / 1e6,
               "mean_ttft_ms": res.metrics["mean_ttft_ms"], "mean_tpot_ms": res.metrics["mean_tpot_ms"],
               "errors": sum(1 for t in tx if t["error"]), "wall_s": wall}
        row["kv_MBps_link_busy"] = nbytes / max(_busy(tx), 1e-9) / 1e6
        row["link_busy_over_shaped"] = row["kv_MBps_link_busy"] / row["shaped_MBps"]
        w = sorted(nb / max(dt, 1e-9) for t in tx for nb, dt in t.get("writes", []))
        row["layer_write_MBps_median"] = w[len(w) // 2] / 1e6 if w else 0.0
        row["layer_write_bytes"] = sum(nb for t in tx for nb, _ in t.get("writes", [])) / max(1, len(w))
        row["write_over_shaped"] = row["layer_write_MBps_median"] / row["shaped_MBps"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"machine": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(),
            "command": "python benchmarks/serve_netns.py " + " ".join(sys.argv[1:]), "traffic": args.traffic,
            "model": "random Llama hidden 256, 8 layers, 2 KV heads x 64, fp32 (8 KiB of KV per token)",
            "load_average": os.getloadavg(), "cpu_seconds": time.process_time()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-netns-{args.machine}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["rate_mbit", "shaped_MBps", "kv_bytes_per_request", "kv_MBps_link_busy", "link_busy_over_shaped",
            "layer_write_bytes", "layer_write_MBps_median", "write_over_shaped", "kv_MBps_median", "kv_MBps_over_windows", "mean_ttft_ms", "mean_tpot_ms", "errors"]
    lines = [f"# Disaggregated serving across two emulated hosts ({args.machine})", "", f"`{meta['command']}`", "",
             f"{meta['platform']}, {meta['cpus']} CPUs, load average at the end {meta['load_average']}", "",
             f"Prefill worker in namespace host 0, decode worker in host 1, both host links shaped with tc htb; "
             f"model: {meta['model']}; traffic `{args.traffic}`. KV MB/s per request = its KV bytes / (first layer's "
             "write → last layer's completion; the window also holds the prefill compute it overlaps); "
             "layer_write_MBps = one layer's paged write (bytes / submit → completion; with writes queued behind "
             "each other on the lanes this is below the link's rate); kv_MBps_link_busy = all KV bytes / the time "
             "at least one hand-off was in flight (the union of the windows): the link's rate while it carried KV.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out / f"serve-netns-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Replicas: 1 vs 2 tritonserver replicas, each pinned to its own core, behind nginx (gRPC, least_conn),
the same open-loop Poisson traces at several offered loads. Reports SLO attainment per load and the
goodput at 90% attainment (the highest offered rate whose attainment is >= 0.9, interpolated between the
measured loads), as ratios 2 replicas / 1 replica.

The load balancer is Debian's nginx (`apt-get install nginx-light`): `grpc_pass` to an upstream with
`least_conn`, which balances each gRPC call (HTTP/2 stream), not each connection. Both set-ups go through
the same nginx, so the proxy hop is in both. Every process of a replica (tritonserver and its Python stubs,
all threads) is pinned to one core; nginx and the load generator are not pinned: with one replica they
have the other core to themselves, with two they share both cores with the replicas.

Writes perf/results/replicas.json (+ .png). Run: python -m perf.replicas
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, tiny_unet_repo, write_result
from perf.slo import SIZES, isolated_ms, scrape_all

NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream tessera {{
    least_conn;
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{
      grpc_pass grpc://tessera;
      grpc_read_timeout 600s;
      grpc_send_timeout 600s;
      client_max_body_size 64m;
    }}
  }}
}}
"""


def nginx_config(directory: Path, port: int, grpc_ports: list[int]) -> str:
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in grpc_ports)
    return NGINX_CONF.format(dir=directory, port=port, servers=servers)


def goodput_at(loads_rps: list[float], attainment: list[float], target: float = 0.9) -> float:
    """The highest offered rate with attainment >= target, interpolated linearly between measured loads
    (0 when even the lowest load misses it; the highest load when none misses it)."""
    best = 0.0
    for i, (rate, sar) in enumerate(zip(loads_rps, attainment, strict=True)):
        if sar >= target:
            best = rate
            if i + 1 < len(loads_rps) and attainment[i + 1] < target:
                r2, s2 = loads_rps[i + 1], attainment[i + 1]
                best = rate + (r2 - rate) * (sar - target) / (sar - s2)
        else:
            break
    return best


def cpu_seconds(pgid: int | None = None) -> float:
    """CPU time (user + system) of a process group's members, or of this process (None)."""
    if pgid is None:
        t = os.times()
        return t.user + t.system
    from tessera.server import _group_members

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in _group_members(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def answered(server) -> float:
    """Requests the replica's engine has answered, any outcome (tessera_requests_total)."""
    return sum(v for lab, v in scrape_all(server.metrics_url, "tessera_requests_total") if lab.get("model") == "engine")


def pin(pgid: int, core: int) -> int:
    """Every thread of every process in the group onto one core; returns the threads pinned."""
    from tessera.server import _group_members

    n = 0
    for pid in _group_members(pgid):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {core})
                n += 1
            except (ProcessLookupError, PermissionError):
                pass
    return n


class Nginx:
    def __init__(self, grpc_ports: list[int]):
        from tessera.server import free_port

        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise SystemExit("nginx: not installed; allowed: `apt-get install nginx-light` (Debian 12)")
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-nginx-"))
        self.port = free_port()
        (self.dir / "nginx.conf").write_text(nginx_config(self.dir, self.port, grpc_ports))
        self.proc = subprocess.Popen([binary, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not listen; see {self.dir / 'error.log'}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def build_parser() -> argparse.ArgumentParser:
    ap = parser("replicas", __doc__)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of offered load per run")
    ap.add_argument("--loads", default="0.5,1.0,1.5,2.0,2.5", help="offered loads, x one replica's capacity")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    ap.add_argument("--slo-scale", type=float, default=5.0, help="SLO = this x the isolated latency per size")
    ap.add_argument("--seed", type=int, default=7, help="trace seed")
    ap.add_argument("--name", default="replicas", help="result file name")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.traces import poisson
    from tessera.server import TritonServer

    loads = [float(x) for x in args.loads.split(",")]
    work, _, repo = tiny_unet_repo("replicas")
    servers = [TritonServer(repo, log_path=work / f"server{k}.log") for k in range(2)]
    out: dict[str, dict] = {}
    try:
        for k, server in enumerate(servers):
            server.start()
            print(f"[tessera] replicas: replica {k} ready on {server.grpc_url}, {pin(server.proc.pid, k)} threads "
                  f"pinned to core {k}", flush=True)
        iso = isolated_ms(servers[0], "txt2img", args.steps, 2)
        slo = {key: args.slo_scale * v for key, v in iso.items()}
        capacity = 1000.0 / float(np.mean(list(iso.values())))  # one replica, requests one at a time
        for n in (1, 2):
            lb = Nginx([s.grpc_port for s in servers[:n]])
            try:
                rows = []
                for load in loads:
                    trace = poisson(load * capacity, args.duration, SIZES, (1, 1, 1), args.steps, args.seed)
                    before = [(answered(s), cpu_seconds(s.proc.pid)) for s in servers]
                    client_cpu, nginx_cpu, t0 = cpu_seconds(), cpu_seconds(lb.proc.pid), time.monotonic()
                    recs = replay(lb.url, "txt2img", trace, slo, drain_s=300)
                    wall = time.monotonic() - t0
                    row = summarize(recs, args.duration)
                    row.pop("raw", None)
                    row |= {"load_x": load, "offered_rps": load * capacity, "wall_s": wall,
                            "answered": sum(r.status != "pending" for r in recs),
                            "per_replica_answered": [answered(s) - b[0] for s, b in zip(servers, before, strict=True)],
                            "per_replica_cpu_share": [(cpu_seconds(s.proc.pid) - b[1]) / wall
                                                      for s, b in zip(servers, before, strict=True)],
                            "client_cpu_share": (cpu_seconds() - client_cpu) / wall,
                            "nginx_cpu_share": (cpu_seconds(lb.proc.pid) - nginx_cpu) / wall}
                    rows.append(row)
                    print(f"[tessera] replicas {n}: load {load:.1f}x ({load * capacity:.2f} req/s): "
                          f"{row['requests']} sent, SAR {row['slo_attainment']:.3f}, "
                          f"goodput {row['goodput_rps']:.2f} req/s; per replica {row['per_replica_answered']}, "
                          f"cpu {[round(c, 2) for c in row['per_replica_cpu_share']]}, client "
                          f"{row['client_cpu_share']:.2f}, nginx {row['nginx_cpu_share']:.2f}", flush=True)
            finally:
                lb.stop()
            sar = [r["slo_attainment"] for r in rows]
            out[f"{n}"] = {"runs": rows, "goodput_at_90_rps": goodput_at([r["offered_rps"] for r in rows], sar)}
    finally:
        for server in servers:
            server.stop()
    g1, g2 = out["1"]["goodput_at_90_rps"], out["2"]["goodput_at_90_rps"]
    ratios = {"goodput_at_90": g2 / g1 if g1 else None,
              "slo_attainment_by_load": {f"{load}x": b["slo_attainment"] / max(a["slo_attainment"], 1e-9)
                                         for load, a, b in zip(loads, out["1"]["runs"], out["2"]["runs"], strict=True)}}
    config = vars(args) | {"sizes": SIZES, "capacity_rps_one_replica": capacity, "cpu_cores": os.cpu_count(),
                           "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()}, "model": "tiny UNet",
                           "load_balancer": "nginx 1.22 grpc_pass, least_conn (Debian nginx-light)",
                           "baseline": "1 replica behind the same nginx, same traces, same run"}
    path = write_result(args.name, config, {"replicas": out, "ratios_2_vs_1": ratios})
    _plot(out, loads, RESULTS / f"{args.name}.png")
    print(f"[tessera] replicas: wrote {path}; goodput at 90% attainment {g1:.2f} -> {g2:.2f} req/s; ratios {ratios}")
    return 0


def _plot(out: dict, loads: list[float], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n, res in out.items():
        rates = [r["offered_rps"] for r in res["runs"]]
        a.plot(rates, [r["slo_attainment"] for r in res["runs"]], "o-", label=f"{n} replica(s)")
        b.plot(rates, [r["goodput_rps"] for r in res["runs"]], "o-", label=f"{n} replica(s)")
    a.axhline(0.9, color="gray", ls=":", lw=1)
    a.set_xlabel("offered load (req/s)")
    a.set_ylabel("SLO attainment")
    b.set_xlabel("offered load (req/s)")
    b.set_ylabel("goodput (req/s within SLO)")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("tritonserver replicas pinned to one core each, behind nginx (gRPC least_conn)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())

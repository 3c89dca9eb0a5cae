"""perf.replicas' pure parts: goodput at 90% attainment and the nginx configuration it writes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from perf.replicas import goodput_at, nginx_config


def test_goodput_interpolates_where_attainment_crosses_the_target():
    assert goodput_at([1, 2, 3], [1.0, 0.95, 0.85]) == pytest.approx(2.5)
    assert goodput_at([1, 2, 3], [1.0, 0.99, 0.95]) == 3  # never misses: the highest load measured
    assert goodput_at([1, 2, 3], [0.8, 0.95, 1.0]) == 0.0  # misses at the lowest load
    assert goodput_at([1, 2], [0.9, 0.5]) == 1  # exactly at the target


def test_nginx_config_balances_grpc_per_call_over_every_replica(tmp_path):
    conf = nginx_config(tmp_path, 8500, [9001, 9002])
    assert "least_conn;" in conf and "grpc_pass grpc://tessera;" in conf and "listen 127.0.0.1:8500 http2;" in conf
    assert conf.count("server 127.0.0.1:") == 2 and "127.0.0.1:9002;" in conf
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if shutil.os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light): syntax not checked")
    (tmp_path / "nginx.conf").write_text(conf)
    r = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr

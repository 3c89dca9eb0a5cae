"""`python -m perf.gpu --device cpu`: the GPU check's tiny CPU case, run as CI runs it, so it cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root: perf/ is run from there


def test_gpu_check_cpu_case_writes_every_mode_and_the_batch_sweep(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "perf.gpu", "--device", "cpu", "--out", str(out),
           "--requests", "4", "--steps", "2", "--batches", "1,2", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert doc["config"]["device"] == "cpu" and doc["git_commit"] is not None
    assert set(doc["throughput"]) == {"concat", "patches", "tiled"}
    for mode, r in doc["throughput"].items():
        assert r["requests"] == 4 and r["images"] == 4, mode
        assert math.isfinite(r["ratio_vs_concat"]) and r["ratio_vs_concat"] > 0, mode
        assert r["calls_per_step"] >= 1
    assert doc["throughput"]["concat"]["ratio_vs_concat"] == 1.0
    assert doc["throughput"]["patches"]["calls_per_step"] == 1.0  # every resolution in one exact call
    sizes = {f"{h}x{w}" for h, w in doc["config"]["sizes"]} | {"mixed"}
    assert set(doc["step_latency_ms"]) == {"concat", "patches", "tiled"}
    for mode, per_size in doc["step_latency_ms"].items():
        assert set(per_size) == sizes, mode
        for row in per_size.values():
            assert set(row) == {"1", "2"} and all(math.isfinite(v) and v > 0 for v in row.values())


def test_gpu_check_refuses_cuda_without_a_gpu_or_fp16_on_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    gpu_check = [sys.executable, "-m", "perf.gpu"]
    fp16 = subprocess.run([*gpu_check, "--device", "cpu", "--dtype", "fp16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert fp16.returncode == 2 and "--dtype fp16" in fp16.stderr
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run(gpu_check, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--device cuda" in proc.stderr and "--device cpu" in proc.stderr

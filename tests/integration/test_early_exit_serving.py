"""Entropy early exit through the real server on the committed heavy reference model: requests end with
fewer steps than asked, say so in their `step` output, keep paired fidelity against their full-step
images (the quality smoke test's check), and a request may turn it off. Metrics count the steps saved."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tessera.client import infer, make_client, request_arrays
from tessera.quality.harness import FULL_STEPS, GUIDANCE, generate_served, jobs_for, passes_paired
from tessera.quality.metrics import paired

pytestmark = pytest.mark.integration
MODELS = Path(__file__).resolve().parents[2] / "quality_models"


def metric_sum(server, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (label order does not matter)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.mark.skipif(not (MODELS / "heavy").is_dir(), reason="quality_models/heavy is not committed")
def test_served_early_exit_saves_steps_and_keeps_paired_fidelity(server):
    jobs = jobs_for((0,), (64, 64))  # 48 prompts, one seed
    saved_before = metric_sum(server, "tessera_steps_saved_total", model="ref_engine_ee", cause="early_exit")
    full, full_steps = generate_served(server, "ref_txt2img", jobs, FULL_STEPS, with_steps=True)
    early, early_steps = generate_served(server, "ref_txt2img_ee", jobs, FULL_STEPS, with_steps=True)
    assert (full_steps == FULL_STEPS).all()
    assert (early_steps < FULL_STEPS).all() and (early_steps >= 15).all()  # the floor: 30% of 50
    fid = paired(early, full)
    assert passes_paired(fid), fid
    want = int((FULL_STEPS - early_steps).sum())
    deadline = time.monotonic() + 30  # metrics are applied on their own thread, just after the answers
    while (saved := metric_sum(server, "tessera_steps_saved_total", model="ref_engine_ee", cause="early_exit")) \
            - saved_before < want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert saved - saved_before == want
    assert metric_sum(server, "tessera_steps_run_count", model="ref_engine_ee") >= len(jobs)
    # opting out on the same server: all steps, and the very image of the full-step path
    client = make_client("grpc", server.grpc_url)
    lb, seed, (h, w) = jobs[0]
    img, steps = infer(client, "grpc", request_arrays(lb.caption, h, w, FULL_STEPS, GUIDANCE, seed, early_exit=False),
                       model="ref_txt2img_ee")
    client.close()
    assert steps.tolist() == [FULL_STEPS] and np.array_equal(img[0], full[0])

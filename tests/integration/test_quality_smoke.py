"""Quality smoke test (CI): the committed heavy reference model, served by Tessera, keeps paired
fidelity on a 10-step path against its full-step path, and a deliberately broken path (2 steps)
fails the same check. Paired metrics only: per image, low variance (docs/quality.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tessera.quality.harness import FULL_STEPS, generate_served, jobs_for
from tessera.quality.harness import passes_paired as passes
from tessera.quality.metrics import paired

pytestmark = pytest.mark.integration
MODELS = Path(__file__).resolve().parents[2] / "quality_models"
# The check (harness.MIN_PSNR_DB / MIN_SSIM) was calibrated on the committed heavy model through the server.

@pytest.mark.skipif(not (MODELS / "heavy").is_dir(), reason="quality_models/heavy is not committed")
def test_quality_smoke_ten_steps_pass_two_steps_fail(server):
    jobs = jobs_for((0,), (64, 64))  # 48 prompts, one seed
    full = generate_served(server, "ref_txt2img", jobs, FULL_STEPS)
    ten = generate_served(server, "ref_txt2img", jobs, 10)
    two = generate_served(server, "ref_txt2img", jobs, 2)
    good, broken = paired(ten, full), paired(two, full)
    assert passes(good), good
    assert not passes(broken), broken
    assert full.shape == (48, 64, 64, 3) and np.std(full) > 5

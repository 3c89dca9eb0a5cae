"""The cascade's discriminator and the served-quality accounting (issue 17), on CPU in seconds: the ONNX export
equals torch at two sizes, a few training steps separate real renders from noise, and the accounting scores real
renders as right with a small FD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.quality.discriminator import Discriminator, auc, export_onnx, real_images, score

ROOT = Path(__file__).resolve().parents[2]


def test_export_equals_torch_and_resizes_any_size(tmp_path):
    torch.manual_seed(0)
    assert export_onnx(Discriminator(), tmp_path / "d.onnx") < 1e-5


def test_a_few_steps_tell_real_renders_from_noise():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    real = real_images(64, seed=1)
    fake = np.clip(real.astype(int) + rng.normal(0, 40, real.shape), 0, 255).astype(np.uint8)
    model = Discriminator()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(np.concatenate([real, fake]))
    y = torch.cat([torch.ones(64), torch.zeros(64)])
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logit(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert auc(score(model, real_images(32, seed=2)), score(model, fake[:32])) > 0.9
    assert auc(np.array([0.9, 0.8]), np.array([0.1, 0.8])) == pytest.approx(0.875)  # ties count half


@pytest.mark.skipif(not (ROOT / "quality_models" / "evaluator.pt").exists(), reason="no committed evaluator")
def test_accounting_scores_real_renders_right_with_a_small_fd():
    from tessera.quality.accounting import real_features, served_quality
    from tessera.quality.features import load_evaluator
    from tessera.quality.shapes import all_labels, render

    ev = load_evaluator(ROOT / "quality_models" / "evaluator.pt")
    rng = np.random.default_rng(3)
    labels = all_labels()
    images = [(render(labels[i % 48], 64, 64, rng) * 255).round().astype(np.uint8) for i in range(96)]
    prompts = [labels[i % 48].caption for i in range(96)]
    real = real_features(ev, 400, seed=5)
    q = served_quality(ev, images, prompts, real, n_fd=64)
    assert q["n"] == 96 and q["adherence"] > 0.95 and q["fd_n"] == 64
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(96)]
    qn = served_quality(ev, noise, prompts, real, n_fd=64)
    assert qn["adherence"] < 0.2 and qn["fd"] > 3 * q["fd"]


def test_add_discriminator_exports_onnx_from_the_committed_weights(tmp_path):
    """A clone holds discriminator.pt (ONNX files are git-ignored build outputs): add_discriminator exports the
    model from it, and the served ONNX scores as the trained torch module does."""
    import json

    import onnxruntime as ort
    from tessera_export.repository import add_discriminator

    torch.manual_seed(1)
    model = Discriminator().eval()
    src = tmp_path / "trained"
    src.mkdir()
    torch.save(model.state_dict(), src / "discriminator.pt")
    (src / "discriminator.json").write_text(json.dumps({"profile": {}}))
    vdir = add_discriminator(tmp_path / "repo", src, "disc")
    assert sorted(p.name for p in vdir.iterdir()) == ["discriminator.json", "model.onnx", "model.py"]
    images = real_images(4, seed=3)
    got = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    assert got.shape == (4, 1) and np.abs(got[:, 0] - score(model, images)).max() < 1e-5
    (src / "discriminator.pt").unlink()
    with pytest.raises(Exception, match="discriminator.pt"):
        add_discriminator(tmp_path / "repo", src, "disc")

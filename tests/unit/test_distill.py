"""The cascade's few-step student (issue 17, tessera.quality.distill): the sampler it is trained through is the
diffusers pipeline's (so the served student is the trained one), a short run lowers the distillation loss on
its batch, and train_student writes a pipeline that loads plainly, with its record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = Path(__file__).resolve().parents[2] / "quality_models"
pytestmark = pytest.mark.skipif(not (MODELS / "heavy").is_dir(), reason="quality_models/heavy is not committed")


@pytest.fixture(scope="module")
def teacher():
    from tessera_export.tiny import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(MODELS / "heavy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sample_is_the_diffusers_pipelines_sampler(teacher):
    from tessera.quality.distill import _embed, sample

    captions = ["a red circle at top left", "a blue square at bottom right"]
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    want = teacher(captions, height=64, width=64, num_inference_steps=2, guidance_scale=4.0, latents=noise.clone(),
                   output_type="latent").images
    with torch.no_grad():
        got = sample(teacher.unet, teacher.scheduler, noise, _embed(teacher, captions), _embed(teacher, [""]).expand(2, -1, -1),
                     2, 4.0)
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert float((got - want).abs().max()) < 1e-5


def test_a_few_distillation_steps_lower_the_loss_on_their_batch(teacher):
    import copy

    import torch.nn.functional as F
    from tessera.quality.distill import _embed, sample, sample_all

    torch.manual_seed(0)
    captions = ["a green triangle at top right"] * 4
    noise = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    cond, uncond = _embed(teacher, captions), _embed(teacher, [""])
    target = sample_all(teacher.unet, teacher.scheduler, noise, cond, uncond, 20, 4.0)
    student = copy.deepcopy(teacher.unet).train().requires_grad_(True)
    sampler = copy.deepcopy(teacher.scheduler)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(sample(student, sampler, noise, cond, uncond.expand(4, -1, -1), 1, 4.0), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_train_student_writes_a_plain_pipeline_and_its_record(tmp_path):
    from diffusers import DiffusionPipeline
    from tessera.quality.distill import train_student

    rec = train_student(tmp_path / "student", MODELS / "heavy", MODELS / "evaluator.pt", steps=1, teacher_steps=3,
                        pairs=8, held_out=6, train_steps=2, batch=4)
    saved = json.loads((tmp_path / "student" / "training.json").read_text())
    assert saved == json.loads(json.dumps(rec)) and rec["train_steps"] == 2 and rec["held_out"]["n"] == 6
    for name in ("student", "teacher_few", "teacher"):
        v = rec["held_out"][name]
        assert 0.0 <= v["right"] <= 1.0 and v["right"] + v["wrong"] == pytest.approx(1.0)
    assert rec["held_out"]["teacher"]["latent_mse_to_teacher"] == 0.0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", local_files_only=True)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32} and pipe.text_encoder.dtype == torch.float32
    out = pipe("a red circle at top left", height=64, width=64, num_inference_steps=1,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_the_critic_learns_real_renders_from_flat_images_and_gives_the_student_a_gradient():
    """--adversarial: the critic's hinge updates separate real rendered images from generated-looking ones (flat
    grey here), and its generator loss reaches the student's pixels."""
    from tessera.quality.distill import Critic

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    critic = Critic(seed=0, pool=64)
    flat = torch.zeros((16, 3, 64, 64))
    losses = [critic.update(flat, rng) for _ in range(30)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert float(critic.net.logit_pixels(critic.real[:16]).mean()) > float(critic.net.logit_pixels(flat).mean())
    pixels = flat.clone().requires_grad_(True)
    critic.generator_loss(pixels).backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0


def test_adversarial_training_records_the_critic_and_the_curve(tmp_path):
    from tessera.quality.distill import train_student

    rec = train_student(tmp_path / "student", MODELS / "heavy", MODELS / "evaluator.pt", steps=1, teacher_steps=2,
                        pairs=4, held_out=4, train_steps=2, batch=2, adversarial=0.5, curve_every=1)
    assert rec["adversarial"] == 0.5 and rec["critic"]["real_pool"] == 4096
    assert [c["step"] for c in rec["curve"]] == [1, 2]
    assert all(np.isfinite(c["fd_vs_real"]) and 0.0 <= c["right"] <= 1.0 for c in rec["curve"])
    assert all(np.isfinite(rec["held_out"][k]["fd_vs_real"]) for k in ("student", "teacher_few", "teacher"))


def test_train_student_names_a_bad_setting(tmp_path):
    from tessera.errors import ConfigError
    from tessera.quality.distill import train_student

    with pytest.raises(ConfigError, match="steps: allowed >= 1, got 0"):
        train_student(tmp_path / "s", MODELS / "heavy", MODELS / "evaluator.pt", steps=0)
    with pytest.raises(ConfigError, match="adversarial: allowed >= 0"):
        train_student(tmp_path / "s", MODELS / "heavy", MODELS / "evaluator.pt", adversarial=-1.0)


def test_train_student_from_another_unet_keeps_its_architecture(tmp_path):
    """--init: the student starts from the light reference's smaller UNet behind the teacher's text encoder and VAE."""
    from diffusers import DiffusionPipeline
    from tessera.quality.distill import train_student

    if not (MODELS / "light").is_dir():
        pytest.skip("quality_models/light is not committed")
    rec = train_student(tmp_path / "student", MODELS / "heavy", MODELS / "evaluator.pt", steps=1, teacher_steps=2,
                        pairs=4, held_out=2, train_steps=1, batch=2, init_dir=MODELS / "light")
    light = json.loads((MODELS / "light" / "unet" / "config.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", local_files_only=True)
    assert list(pipe.unet.config.block_out_channels) == light["block_out_channels"] == [32, 64, 64]
    assert rec["init"] == str(MODELS / "light") and rec["student_params"] < rec["teacher_params"]
    assert rec["student_params"] == sum(p.numel() for p in pipe.unet.parameters())
    heavy = DiffusionPipeline.from_pretrained(MODELS / "heavy", local_files_only=True)
    for a, b in zip(pipe.text_encoder.parameters(), heavy.text_encoder.parameters()):
        assert torch.equal(a, b)

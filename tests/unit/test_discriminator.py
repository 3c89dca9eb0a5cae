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
    assert "input_ids" not in (vdir.parent / "config.pbtxt").read_text()  # an image-only record: one input
    images = real_images(4, seed=3)
    got = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    assert got.shape == (4, 1) and np.abs(got[:, 0] - score(model, images)).max() < 1e-5
    (src / "discriminator.pt").unlink()
    with pytest.raises(Exception, match="discriminator.pt"):
        add_discriminator(tmp_path / "repo", src, "disc")


TOKENIZER = ROOT / "quality_models" / "heavy" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip("no committed reference pipeline")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


def test_near_miss_changes_exactly_one_attribute():
    from tessera.quality.discriminator import near_miss
    from tessera.quality.shapes import all_labels

    rng = np.random.default_rng(0)
    changed = np.zeros(3, int)
    for label in all_labels():
        for _ in range(20):
            diff = label.as_array() != near_miss(label, rng).as_array()
            assert diff.sum() == 1
            changed += diff
    assert (changed > 100).all()  # colour, shape and position each changed


def test_prompt_discriminator_export_takes_image_and_prompt_ids_and_equals_torch(tmp_path, tokenizer):
    import onnxruntime as ort
    from tessera.quality.discriminator import PromptDiscriminator
    from tessera.tokenizer import padded_ids

    torch.manual_seed(0)
    model = PromptDiscriminator(len(tokenizer), tokenizer.pad_token_id)
    assert export_onnx(model, tmp_path / "d.onnx") < 1e-5
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "input_ids"]
    images, ids = real_images(2, seed=4), padded_ids(tokenizer, ["a red circle at top left", "a red square at top left"])
    assert ids.shape == (2, tokenizer.model_max_length) and ids.dtype == np.int64
    got = sess.run(None, {"image": images, "input_ids": ids})[0][:, 0]
    assert np.abs(got - score(model, images, ids)).max() < 1e-5
    # padding does not count: the same prompt with more padding scores the same
    longer = np.concatenate([ids, np.full((2, 5), tokenizer.pad_token_id)], axis=1)
    assert np.abs(score(model, images, longer) - score(model, images, ids)).max() < 1e-5


def test_a_few_hundred_steps_tell_an_images_own_prompt_from_a_near_miss(tokenizer):
    """The image+prompt recipe on real renders alone (generated share 0): held out, an image with its own caption
    scores above the same image with one attribute of the caption changed."""
    from tessera.options import DiscriminatorInput
    from tessera.quality.discriminator import _fit, _prompt_sampler, build, near_miss
    from tessera.quality.shapes import parse_caption
    from tessera.tokenizer import padded_ids

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    real, caps = real_images(384, seed=1, captions=True)
    record = {"inputs": DiscriminatorInput.IMAGE_PROMPT.value,
              "tokenizer": {"vocab": len(tokenizer), "pad_id": tokenizer.pad_token_id}}
    model = build(record)
    losses, _ = _fit(model, _prompt_sampler(real, caps, real[:0], [], tokenizer, 0.0, rng), 300)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    test, test_caps = real_images(96, seed=2, captions=True)
    miss = [near_miss(parse_caption(c), rng).caption for c in test_caps]
    own, other = score(model, test, padded_ids(tokenizer, test_caps)), score(model, test, padded_ids(tokenizer, miss))
    assert auc(own, other) > 0.8


def test_add_discriminator_declares_the_prompt_input_of_an_image_prompt_discriminator(tmp_path, tokenizer):
    import json

    from tessera.errors import ConfigError
    from tessera.quality.discriminator import PromptDiscriminator, build
    from tessera_export.repository import add_discriminator

    record = {"inputs": "image+prompt", "tokenizer": {"vocab": len(tokenizer), "pad_id": tokenizer.pad_token_id},
              "profile": {}}
    src = tmp_path / "trained"
    src.mkdir()
    torch.save(PromptDiscriminator(len(tokenizer), tokenizer.pad_token_id).state_dict(), src / "discriminator.pt")
    (src / "discriminator.json").write_text(json.dumps(record))
    vdir = add_discriminator(tmp_path / "repo", src, "disc")
    config = (vdir.parent / "config.pbtxt").read_text()
    assert config.count("name: \"input_ids\"") == 1 and "TYPE_INT64" in config
    with pytest.raises(ConfigError, match="inputs: unknown value; allowed image, image\\+prompt"):
        build({"inputs": "prompt"})
    from tessera.quality.discriminator import train_discriminator

    with pytest.raises(ConfigError, match="generated_share, ablate: settings of inputs image\\+prompt only"):
        train_discriminator(tmp_path / "out", "light", "heavy", "evaluator.pt", light_steps=1, generated_share=0.1)

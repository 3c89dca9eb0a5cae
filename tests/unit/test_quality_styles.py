"""Styles of the shapes world (issue 14's reference adapters): plain is today's rendering byte for byte; the
other styles differ from it and keep the label's colour dominant; the style evaluator trains and reports."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tessera.quality import shapes as S


# SHA-256 of shapes.render's output before styles existed (computed with that code, kept here instead of a copy
# of it): CASES rendered in order, and the 6-image batch of seed 3 at 64x128.
BEFORE_STYLES_CASES = "6b23a455249190f28642f98f0ab2f939af013a97cdb477c81961486fd9779a13"
BEFORE_STYLES_BATCH = "88a4d346183329c5d24ffdaa164eb59141b5dc71f6680c9f77a39ba402a832e5"


CASES = [(lb, hw, seed) for seed in (0, 7) for lb in S.all_labels()[::5] for hw in S.RESOLUTIONS[::3]]


@pytest.mark.parametrize("style_arg", [None, "plain"])
def test_plain_is_byte_identical_to_the_rendering_before_styles(style_arg):
    digest = hashlib.sha256()
    for lb, (h, w), seed in CASES:
        kw = {} if style_arg is None else {"style": style_arg}
        new = S.render(lb, h, w, np.random.default_rng(seed), **kw)
        assert new.dtype == np.float32, (lb, h, w, seed)
        digest.update(new.tobytes())
    assert digest.hexdigest() == BEFORE_STYLES_CASES


def test_batch_default_is_unchanged_and_styles_draw_the_same_random_numbers():
    a = S.batch(6, 64, 128, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    pool = S.all_labels()
    labels = [pool[i] for i in rng.integers(0, len(pool), size=6)]
    assert hashlib.sha256(a[0].tobytes()).hexdigest() == BEFORE_STYLES_BATCH
    assert a[2] == [lb.caption for lb in labels]
    after = {}
    for style in S.STYLES:
        rng = np.random.default_rng(11)
        S.render(S.all_labels()[4], 64, 64, rng, style)
        after[style] = rng.random()
    assert len(set(after.values())) == 1  # same draws: one seed is one scene in every style


def _nearest_colour(rgb: np.ndarray) -> int:
    ref = np.array([S.RGB[c] for c in S.COLOURS])
    cos = ref @ rgb / (np.linalg.norm(ref, axis=1) * np.linalg.norm(rgb) + 1e-9)
    return int(np.argmax(cos))


@pytest.mark.parametrize("style", S.STYLES[1:])
def test_other_styles_differ_and_keep_the_label_colour_dominant(style):
    for lb, (h, w), seed in CASES:
        plain = S.render(lb, h, w, np.random.default_rng(seed))
        img = S.render(lb, h, w, np.random.default_rng(seed), style)
        assert img.shape == plain.shape and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
        assert (np.abs(img - plain).max(-1) > 0.05).mean() > 0.002, (style, lb)
        bg = np.median(img.reshape(-1, 3), axis=0)
        obj = np.abs(img - bg).max(-1) > 0.2
        assert obj.sum() > 0.01 * h * w, (style, lb)
        assert _nearest_colour(img[obj].mean(0)) == lb.colour, (style, lb)
    with pytest.raises(ValueError, match="style"):
        S.render(S.all_labels()[0], 64, 64, np.random.default_rng(0), "sketchy")


def test_style_specifics():
    lb = S.Label(0, 0, 0)  # a red circle at top left
    plain, outlined, striped, dark = (S.render(lb, 128, 128, np.random.default_rng(1), s) for s in S.STYLES)
    assert dark[-20:, -20:].mean() < 0.5 * plain[-20:, -20:].mean()  # background corner darker
    red = lambda im: (im[..., 0] > 0.5) & (im[..., 1] < 0.3)  # noqa: E731
    assert 0.2 < red(outlined).sum() / red(plain).sum() < 0.9  # a ring: part of the disc
    assert 0.2 < red(striped).sum() / red(plain).sum() < 0.8  # bands: part of the disc in full colour


def test_style_evaluator_trains_and_writes_metadata(tmp_path):
    import torch

    from tessera.quality.style_eval import REPORT_NAME, WEIGHTS_NAME, load_style_evaluator, predict_styles
    from tessera.quality.style_eval import train_style_evaluator

    threads = torch.get_num_threads()
    try:
        report = train_style_evaluator(tmp_path / "out", tmp_path / "work", minutes=1, steps=2, n_test=1,
                                       batch_size=4)
        again = train_style_evaluator(tmp_path / "out", tmp_path / "work", minutes=1, steps=3, n_test=1,
                                      batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert report["steps"] == 2 and again["steps"] == 3 and again["resumed_from_step"] == 2
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert set(saved["test_accuracy"]) == {*S.STYLES, "mean", "n"} and saved["wall_s"] >= report["wall_s"]
    model = load_style_evaluator(tmp_path / "out" / WEIGHTS_NAME)
    images = S.batch(3, 64, 128, np.random.default_rng(0), style="dark")[0]
    pred = predict_styles(model, (images * 255).astype(np.uint8))
    assert pred.shape == (3,) and set(pred.tolist()) <= set(range(len(S.STYLES)))


def test_style_evaluator_roundtrip_training_goes_through_the_vae(tmp_path, tiny_pipelines):
    import torch

    from tessera.quality.style_eval import train_style_evaluator, vae_roundtrip

    from tessera.errors import ConfigError

    with pytest.raises(ConfigError, match="roundtrip: needs a VAE"):
        train_style_evaluator(tmp_path / "o", tmp_path / "w", steps=1, roundtrip=0.5)
    with pytest.raises(ConfigError, match=r"roundtrip: allowed \[0, 1\]"):
        train_style_evaluator(tmp_path / "o", tmp_path / "w", steps=1, roundtrip=2,
                              vae_dir=tiny_pipelines["unet"] / "vae")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipelines["unet"] / "vae").eval()
    images = S.batch(2, 64, 64, np.random.default_rng(0), style="striped")[0]
    out = vae_roundtrip(vae, images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1 and not np.allclose(out, images, atol=0.02)
    threads = torch.get_num_threads()
    try:
        report = train_style_evaluator(tmp_path / "o", tmp_path / "w", minutes=1, steps=2, n_test=1, batch_size=4,
                                       vae_dir=tiny_pipelines["unet"] / "vae", roundtrip=1.0)
    finally:
        torch.set_num_threads(threads)
    assert report["roundtrip_share"] == 1.0 and set(report["vae_roundtrip_accuracy"]) == {*S.STYLES, "mean", "n"}

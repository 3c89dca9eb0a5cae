"""Styles of the shapes world (issue 14's reference adapters): plain is today's rendering byte for byte; the
other styles differ from it and keep the label's colour dominant; the style evaluator trains and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tessera.quality import shapes as S


def _render_before_styles(label, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """shapes.render as it was before styles existed (verbatim)."""
    ss = 2
    h, w = height * ss, width * ss
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w  # fractions of the image
    base = rng.uniform(0.12, 0.28)
    tint = rng.uniform(-0.03, 0.03, size=3)
    grad = rng.uniform(-0.06, 0.06)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (base + tint)[None, None, :]
    img += (grad * (yy - 0.5))[..., None]
    row, col = divmod(label.position, 2)
    cy = (0.25 + 0.5 * row) + rng.uniform(-0.06, 0.06)
    cx = (0.25 + 0.5 * col) + rng.uniform(-0.06, 0.06)
    r = rng.uniform(0.13, 0.20)  # of the smaller side
    aspect = h / w
    dy = (yy - cy) / r
    dx = (xx - cx) / r / aspect if aspect < 1 else (xx - cx) / r
    if aspect > 1:
        dy = dy * aspect
    shape = S.SHAPES[label.shape]
    if shape == "circle":
        mask = dx**2 + dy**2 <= 1.0
    elif shape == "square":
        mask = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    else:  # triangle, apex up
        mask = (dy <= 0.8) & (dy >= -1.0 + 1.8 * np.abs(dx) / 1.0) & (np.abs(dx) <= 1.0)
    colour = np.array(S.RGB[S.COLOURS[label.colour]], np.float32) * rng.uniform(0.85, 1.0)
    img[mask] = colour
    img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    img += rng.normal(0, 0.01, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


CASES = [(lb, hw, seed) for seed in (0, 7) for lb in S.all_labels()[::5] for hw in S.RESOLUTIONS[::3]]


@pytest.mark.parametrize("style_arg", [None, "plain"])
def test_plain_is_byte_identical_to_the_rendering_before_styles(style_arg):
    for lb, (h, w), seed in CASES:
        old = _render_before_styles(lb, h, w, np.random.default_rng(seed))
        kw = {} if style_arg is None else {"style": style_arg}
        new = S.render(lb, h, w, np.random.default_rng(seed), **kw)
        assert new.dtype == old.dtype and new.tobytes() == old.tobytes(), (lb, h, w, seed)


def test_batch_default_is_unchanged_and_styles_draw_the_same_random_numbers():
    a = S.batch(6, 64, 128, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    pool = S.all_labels()
    labels = [pool[i] for i in rng.integers(0, len(pool), size=6)]
    old = np.stack([_render_before_styles(lb, 64, 128, rng) for lb in labels])
    assert a[0].tobytes() == old.tobytes() and a[2] == [lb.caption for lb in labels]
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

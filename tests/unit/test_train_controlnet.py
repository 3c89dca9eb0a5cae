"""tessera train-controlnet (issue 15): the control maps, the mismatched adherence set, and a two-step run on the
committed heavy reference that writes a diffusers ControlNet and its training record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tessera.quality.shapes import Label, parse_caption
from tessera.quality.train_controlnet import (ControlSettings, control_map, mismatched_set, scene, train_controlnet,
                                              with_position)

HEAVY = Path(__file__).resolve().parents[2] / "quality_models" / "heavy"


def test_maps_and_captions():
    image, silhouette = scene(Label(1, 1, 2), 64, 128, np.random.default_rng(0), "silhouette")
    _, box = scene(Label(1, 1, 2), 64, 128, np.random.default_rng(0), "box")
    assert image.shape == (64, 128, 3) and silhouette.shape == box.shape == (64, 128)
    ys, xs = np.nonzero(silhouette)
    assert silhouette.max() == 255 and ys.mean() > 32 and xs.mean() < 64  # bottom left
    assert (box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == 255).all() and box.sum() >= silhouette.sum()
    assert with_position("a red circle at top left", 3) == "a red circle at bottom right"
    with pytest.raises(ValueError, match="control"):
        control_map("edges", silhouette > 0)


def test_mismatched_set_puts_every_object_elsewhere():
    prompts, maps, truths = mismatched_set(144, (64, 64), "box", seed=1)  # 3 x 48: shifts 1, 2, 3
    assert maps.shape == (144, 64, 64) and len(prompts) == len(truths) == 144
    said = [parse_caption(p) for p in prompts]
    assert all(s.position != t.position and (s.colour, s.shape) == (t.colour, t.shape) for s, t in zip(said, truths))
    assert len({(s.position, t.position) for s, t in zip(said, truths)}) == 12  # every (prompt, map) pair of positions


@pytest.mark.skipif(not HEAVY.is_dir(), reason="the committed heavy reference is missing")
def test_two_steps_write_a_controlnet_and_its_record(tmp_path):
    from diffusers import ControlNetModel

    report = train_controlnet(tmp_path / "out", HEAVY, tmp_path / "work", kinds=("box",), minutes=5,
                              settings=ControlSettings(steps=2, per_res=2), eval_images=0, command="test")
    assert report["kinds"]["box"]["steps"] == 2 and report["command"] == "test"
    assert json.loads((tmp_path / "out" / "training.json").read_text())["kinds"]["box"]["steps"] == 2
    net = ControlNetModel.from_pretrained(tmp_path / "out" / "box")
    assert net.conv_in.weight.shape[-1] == 3 and report["kinds"]["box"]["parameters"] == sum(
        p.numel() for p in net.parameters())

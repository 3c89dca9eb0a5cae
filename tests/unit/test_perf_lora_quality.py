"""perf/lora_quality.py: the late join (adapter from step K) on the tiny UNet pipeline with a random LoRA, the
paired PSNR, the seed floor and the drops against it, and a --quick run end to end into a temp dir."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from perf import lora_quality as lq

PROMPTS = ["a red circle at top left", "a blue square at bottom right"]
STEPS = 4


@pytest.fixture(scope="module")
def lora_pipe(tiny_pipelines, tmp_path_factory):
    """The tiny UNet pipeline and a random adapter for it (the `outlined` name, so the registry lists it as a
    style), not yet loaded."""
    from tessera_export.tiny import load_pipeline, write_random_lora

    pipe = load_pipeline(tiny_pipelines["unet"])
    pipe.set_progress_bar_config(disable=True)
    lora_dir = tmp_path_factory.mktemp("loras")
    write_random_lora(pipe.unet, lora_dir / "outlined", seed=3, std=0.3,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"])
    return pipe, lora_dir


def _run(pipe, k: int) -> np.ndarray:
    return lq.generate_joined(pipe, PROMPTS, seed=7, steps=STEPS, guidance=4.0, k=k, size=64)


def test_lora_quality_join_matches_the_synchronous_load_and_the_base(lora_pipe):
    from tessera.quality.train_lora import generate

    pipe, lora_dir = lora_pipe
    base = _run(pipe, 0)  # no adapter loaded: K=0 leaves the pipeline alone
    assert np.array_equal(base, generate(pipe, PROMPTS, 7, STEPS, 4.0))
    pipe.load_lora_weights(lora_dir / "outlined", adapter_name="outlined")
    try:
        loaded = generate(pipe, PROMPTS, 7, STEPS, 4.0)  # a plain run with the adapter loaded
        assert not np.array_equal(loaded, base), "the random adapter must change the image"
        assert np.array_equal(_run(pipe, 0), loaded)  # K=0: the synchronous load, bit for bit
        assert np.array_equal(_run(pipe, STEPS), base)  # K=steps: the adapter never joins
        late = {k: _run(pipe, k) for k in range(1, STEPS)}
        for k, im in late.items():
            assert not np.array_equal(im, loaded) and not np.array_equal(im, base), k
        assert not np.array_equal(late[1], late[2])
        assert np.array_equal(generate(pipe, PROMPTS, 7, STEPS, 4.0), loaded)  # enabled again on return
    finally:
        pipe.unload_lora_weights()


def test_lora_quality_callback_enables_after_step_k_minus_1():
    class Pipe:
        def __init__(self) -> None:
            self.calls = 0

        def enable_lora(self) -> None:
            self.calls += 1

    for k, after in ((3, 2), (0, None), (6, 5)):
        pipe, cb, enabled_after = Pipe(), lq.join_callback(k), []
        for step in range(6):  # diffusers calls the callback after step i with i
            before = pipe.calls
            assert cb(pipe, step, None, {"latents": 1}) == {"latents": 1}
            enabled_after += [step] * (pipe.calls - before)
        # K=3: enabled after step 2, so steps 3, 4, 5 run with it; K=0: on from the start, nothing to do;
        # K=steps: enabled only after the last step, which no step uses
        assert enabled_after == ([after] if after is not None else []), k


def test_lora_quality_paired_psnr():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ims = ref.copy()
    ims[1, 0, 0, 0] ^= 1  # one value off by 1: mse = 1/192
    ims[2] = 255 - ref[2]
    res = lq.paired_psnr(ims, ref)
    assert res["identical"] == 1 and res["per_image_db"][0] is None
    one = 10 * math.log10(255**2 * 192)
    assert res["per_image_db"][1] == pytest.approx(one, abs=1e-3)
    assert res["min_db"] == res["per_image_db"][2] < res["mean_db"] < one
    assert lq.paired_psnr(ref, ref) == {"mean_db": None, "min_db": None, "identical": 3,
                                        "per_image_db": [None, None, None]}


def test_lora_quality_seed_floor_and_drops():
    a = {"style": 0.9, "colour": 1.0, "shape": 0.75, "position": 0.5, "style_predicted": {"plain": 1}}
    b = {"style": 0.8, "colour": 1.0, "shape": 0.8, "position": 0.5}
    res = lq.seed_floor(a, b, n=48)
    assert res["measured"] == {"style": 0.1, "colour": 0.0, "shape": 0.05, "position": 0.0}
    assert res["se_diff"]["colour"] == 0.0
    assert res["se_diff"]["style"] == pytest.approx(math.sqrt(0.09 / 48 + 0.16 / 48), abs=1e-4)
    se_shape = round(math.sqrt(0.75 * 0.25 / 48 + 0.8 * 0.2 / 48), 4)  # 0.0853 > the measured 0.05
    assert res["floor"] == {"style": 0.1, "colour": 0.0, "shape": se_shape, "position": res["se_diff"]["position"]}
    assert lq.seed_floor({"colour": 1.0}, {"colour": 0.5, "style": 1.0}, 4)["measured"] == {"colour": 0.5}
    at_k = {"style": 0.8, "colour": 0.98, "shape": 0.8, "position": 0.5}
    drop, within = lq.drops(at_k, a, res["floor"])
    assert drop == {"style": 0.1, "colour": 0.02, "shape": -0.05, "position": 0.0}
    assert within == {"style": True, "colour": False, "shape": True, "position": True}
    assert lq.drops({"colour": 1.0}, {"colour": 1.0}, {}) == ({"colour": 0.0}, {})


def test_lora_quality_estimate():
    # base batch 10 s, K of 20 steps, adapter on x2, disabled x1: K=0 (sets A and B) 2 * 2, K=10 1.5, K=20 1
    assert lq.estimate_s(10.0, 20, [[0, 10], [0, 10, 10, 20]], lora_factor=2.0, disabled_factor=1.0) == \
        pytest.approx(10.0 * (1 + (4 + 1.5) + (4 + 1.5 + 1)))


def test_lora_quality_profiled_k(lora_pipe):
    from tessera.lora_registry import LoraRegistry

    _, lora_dir = lora_pipe
    assert lq.profiled_k(lora_dir, "outlined", 50, None) is None
    assert lq.profiled_k(lora_dir, "outlined", 50, 7) | {"source": ""} == {"k": 7, "k_profile": 7,
                                                                          "from_profile": False, "source": ""}
    profile = LoraRegistry(lora_dir).adapter("outlined").profile_path
    profile.write_text(json.dumps({"k_by_steps": {"50": 50}}))
    try:
        res = lq.profiled_k(lora_dir, "outlined", 50, None)
        assert (res["k"], res["k_profile"], res["from_profile"], res["source"]) == (49, 50, True, str(profile))
        # BAL clamps K to steps - 1: the last step always runs with the adapter
    finally:
        profile.unlink()


def test_lora_quality_refuses_bad_options(lora_pipe):
    _, lora_dir = lora_pipe
    with pytest.raises(SystemExit, match="--ks"):
        lq.main(["--ks", "0,60", "--lora-dir", str(lora_dir)])
    with pytest.raises(SystemExit, match="--ks"):
        lq.main(["--ks", "2,5", "--lora-dir", str(lora_dir)])  # K=0 is the reference
    with pytest.raises(SystemExit, match=r"--styles.*'dark'.*servable there: \['outlined'\]"):
        lq.main(["--styles", "dark", "--lora-dir", str(lora_dir)])


@pytest.mark.parametrize("default_k", [None, 3])
def test_lora_quality_quick_run(lora_pipe, tiny_pipelines, tmp_path, default_k):
    from pathlib import Path

    _, lora_dir = lora_pipe
    evaluators = Path(__file__).resolve().parents[2] / "quality_models"
    out = tmp_path / "lq.json"
    extra = ["--default-k", str(default_k)] if default_k is not None else []
    assert lq.main(["--quick", "--base", str(tiny_pipelines["unet"]), "--lora-dir", str(lora_dir),
                    "--styles", "outlined", "--evaluators", str(evaluators), "--out", str(out), *extra]) == 0
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").exists() and doc["config"]["ks"] == [0, 2, 5]
    res = doc["styles"]["outlined"]
    assert res["profile"] is None  # no profile file: only --default-k, or nothing
    if default_k is None:
        assert res["profiled"] is None and res["profiled_k_within_floor"] is None
        assert [r["k"] for r in res["by_k"]] == [0, 2, 5] and not any(r["profiled"] for r in res["by_k"])
    else:
        assert [r["k"] for r in res["by_k"]] == [0, 2, 3, 5] and res["profiled"]["k"] == 3
        assert [r["profiled"] for r in res["by_k"]] == [False, False, True, False]
    assert res["by_k"][0]["psnr_vs_k0"]["identical"] == 4
    assert all(r["psnr_vs_k0"]["mean_db"] is not None for r in res["by_k"][1:])
    if (evaluators / "evaluator.pt").exists():
        assert set(res["seed_floor"]) >= {"colour", "shape", "position"}
        assert set(res["by_k"][1]["drop_vs_k0"]) == set(res["seed_floor"])

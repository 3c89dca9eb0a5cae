"""`tessera lora-profile` (quality/lora_profile.py): K from a step curve, the profile of random adapters
on the tiny UNet pipeline (checked against Tessera's own merged LoRA path), the file `LoraRegistry` reads
back, and the command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tessera.errors import ConfigError
from tessera.lora_registry import LoraRegistry, parse_profile
from tessera.quality.lora_profile import (
    choose_k,
    lora_profile,
    profile_adapter,
    profile_prompts,
    step_cosine,
    trajectory,
    write_profile,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]  # as conftest's adapters
WEIGHTS = "pytorch_lora_weights.safetensors"
ARGS = dict(seed=0, guidance=4.0, size=64, threshold=0.95)


# -- choose_k (pure) --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("curve", "threshold", "k"),
    [
        ([0.99, 0.98, 0.97, 0.96], 0.95, 3),  # never below: steps - 1 (the last step runs with the adapter)
        ([1.0] * 50, 0.95, 49),
        ([0.99, 0.98, 0.97, 0.90, 0.99], 0.95, 3),  # drops at step 3: three steps may run without it
        ([0.94, 0.99, 0.99], 0.95, 0),  # below from the first step: synchronous load
        ([0.95, 0.95, 0.9], 0.95, 2),  # equal to the threshold counts as above
        ([0.99, 0.5, 0.99, 0.99], 0.95, 1),  # leading steps only: a later recovery does not count
        ([0.99, float("nan"), 0.99], 0.95, 1),  # NaN counts as below
        ([0.2], 0.95, 0),
        ([0.99], 0.95, 0),  # one step: K = 0 either way
    ],
)
def test_choose_k_counts_leading_steps_at_or_above_threshold(curve, threshold, k):
    assert choose_k(curve, threshold) == k


def test_choose_k_rejects_an_empty_curve():
    with pytest.raises(ValueError, match="cosine"):
        choose_k([], 0.95)


def test_profile_prompts_are_the_first_shapes_captions():
    assert profile_prompts(2) == ["a red circle at top left", "a red circle at top right"]
    assert profile_prompts(50)[48:] == profile_prompts(2)  # repeats after the 48 captions
    with pytest.raises(ConfigError, match="prompts"):
        profile_prompts(0)


def test_step_cosine_of_hand_made_latents():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]])  # [steps=2, N=2, 2]
    b = torch.tensor([[[2.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 5.0]]])
    assert step_cosine(a, b) == pytest.approx([0.0, 0.5 * math.sqrt(0.5)])


# -- profiles of real tiny adapters ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_env(tiny_pipelines, tmp_path_factory):
    """The tiny UNet pipeline and a lora_dir with both layouts: `inky` (random, std 0.3, as conftest's),
    `zero` (A = B = 0: changes nothing) as directories, `faint` (std 0.05) as a single file."""
    from conftest import load_unet
    from tessera_export.tiny import load_pipeline, write_random_lora

    d = tmp_path_factory.mktemp("lora-profile")
    loras = d / "loras"
    unet = load_unet(tiny_pipelines["unet"])
    write_random_lora(unet, loras / "inky", seed=1, std=0.3, target_modules=TARGETS)
    write_random_lora(unet, loras / "zero", seed=1, std=0.0, target_modules=TARGETS)
    write_random_lora(unet, d / "faint", seed=2, std=0.05, target_modules=TARGETS)
    (d / "faint" / WEIGHTS).rename(loras / "faint.safetensors")
    pipe = load_pipeline(tiny_pipelines["unet"])
    pipe.set_progress_bar_config(disable=True)
    return dict(dir=loras, pipe=pipe, base=tiny_pipelines["unet"])


def test_profile_of_a_random_adapter_matches_the_merged_trajectory(lora_env):
    from tessera.executors.lora_torch import load_lora, merge, unmerge

    pipe, prompts = lora_env["pipe"], profile_prompts(2)
    before = trajectory(pipe, prompts, 0, 6, 4.0, 64)
    assert before.shape == (6, 2, 4, 8, 8)
    profile = profile_adapter(pipe, lora_env["dir"] / "inky" / WEIGHTS, "inky", [6, 3], prompts, **ARGS)
    curve = profile["cosine_by_steps"]["6"]
    assert len(curve) == 6 and len(profile["cosine_by_steps"]["3"]) == 3
    assert all(-1.0 <= v <= 1.0 for v in curve)
    assert max(curve) < 0.99  # a std-0.3 adapter moves the latents from the first step (measured ~0.93-0.96)
    # the same curve from an independent path: Tessera's own merge of the adapter into the UNet
    merge(pipe.unet, [(load_lora(lora_env["dir"] / "inky"), 1.0)])
    try:
        merged = trajectory(pipe, prompts, 0, 6, 4.0, 64)
    finally:
        unmerge(pipe.unet)
    assert curve == pytest.approx(step_cosine(before, merged), abs=1e-5)
    assert profile["k_by_steps"] == {s: choose_k(c, 0.95) for s, c in profile["cosine_by_steps"].items()}
    # the adapter is unloaded again: the pipeline is the base model, bit for bit
    assert pipe.get_list_adapters() in ({}, {"unet": []})
    assert torch.equal(trajectory(pipe, prompts, 0, 6, 4.0, 64), before)
    table = sorted((int(s), k) for s, k in profile["k_by_steps"].items())
    assert parse_profile(profile).k_by_steps == tuple(table)
    assert profile | {"cosine_by_steps": None, "k_by_steps": None} == {
        "k_by_steps": None, "cosine_by_steps": None, "threshold": 0.95, "prompts": 2, "seed": 0,
        "guidance": 4.0, "size": 64, "base": str(lora_env["base"])}


def test_profile_of_a_zero_adapter_is_one_everywhere(lora_env):
    profile = profile_adapter(lora_env["pipe"], lora_env["dir"] / "zero" / WEIGHTS, "zero", [5, 2],
                              profile_prompts(2), **ARGS)
    assert profile["cosine_by_steps"] == {"2": [1.0] * 2, "5": [1.0] * 5}
    assert profile["k_by_steps"] == {"2": 1, "5": 4}  # steps - 1


def test_profile_adapter_rejects_bad_arguments_and_a_pipeline_with_adapters(lora_env):
    pipe, path = lora_env["pipe"], lora_env["dir"] / "zero" / WEIGHTS
    with pytest.raises(ConfigError, match="steps"):
        profile_adapter(pipe, path, "zero", [0], ["x"], **ARGS)
    with pytest.raises(ConfigError, match="threshold"):
        profile_adapter(pipe, path, "zero", [2], ["x"], **(ARGS | {"threshold": 1.5}))
    pipe.load_lora_weights(path.parent, adapter_name="other")
    try:
        with pytest.raises(ValueError, match="already carries adapters"):
            profile_adapter(pipe, path, "zero", [2], ["x"], **ARGS)
    finally:
        pipe.unload_lora_weights()


def test_written_profiles_are_read_back_by_the_registry(lora_env):
    profiles = lora_profile(lora_env["dir"], lora_env["base"], names=["faint", "zero"], steps_list=[4, 2],
                            n_prompts=2, pipe=lora_env["pipe"])
    assert set(profiles) == {"faint", "zero"}
    registry = LoraRegistry(lora_env["dir"])
    assert (lora_env["dir"] / "faint.profile.json").is_file()  # single-file layout: beside it
    assert (lora_env["dir"] / "zero" / "profile.json").is_file()  # directory layout: inside it
    assert not (lora_env["dir"] / "inky" / "profile.json").exists()  # not asked for
    assert json.loads((lora_env["dir"] / "zero" / "profile.json").read_text()) == profiles["zero"]
    assert [p.name for p in lora_env["dir"].rglob("*.tmp")] == []
    for name in ("faint", "zero"):
        table = {int(s): k for s, k in profiles[name]["k_by_steps"].items()}
        assert registry.profile(name).k_by_steps == tuple(sorted(table.items()))
        assert registry.k_for(name, 4, default_k=0) == table[4]
        assert registry.k_for(name, 2, default_k=0) == table[2]
    assert registry.k_for("zero", 4, default_k=0) == 3


def test_write_profile_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a.profile.json"
    path.write_text("{broken")
    write_profile(path, {"k_by_steps": {"20": 4}})
    assert json.loads(path.read_text()) == {"k_by_steps": {"20": 4}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.profile.json"]


def test_unknown_names_are_refused_with_the_known_adapters(lora_env):
    with pytest.raises(ConfigError, match=r"--names: unknown adapter\(s\) nope; allowed .*faint, inky, zero"):
        lora_profile(lora_env["dir"], lora_env["base"], names=["zero", "nope"], pipe=lora_env["pipe"])


# -- the command ------------------------------------------------------------------------------------------
def test_cli_profiles_every_adapter_of_the_directory(lora_env, tmp_path, capsys):
    import shutil

    from tessera import cli

    loras = tmp_path / "loras"
    shutil.copytree(lora_env["dir"] / "inky", loras / "inky")
    shutil.copy(lora_env["dir"] / "faint.safetensors", loras / "faint.safetensors")
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["lora-profile", str(loras), "--base", str(lora_env["base"]), "--steps", "3,2",
                       "--prompts", "1", "--threshold", "0.9"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    registry = LoraRegistry(loras)
    for name in ("faint", "inky"):
        profile = json.loads(registry.adapter(name).profile_path.read_text())
        assert profile["threshold"] == 0.9 and profile["prompts"] == 1
        assert profile["base"] == str(lora_env["base"])
        assert set(profile["k_by_steps"]) == {"3", "2"}
        ks = profile["k_by_steps"]
        assert f"[tessera] lora-profile {name}: 3 steps K={ks['3']}, 2 steps K={ks['2']}" in out


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--names", "inky,nope"], ("--names: unknown adapter(s) nope; allowed adapters of",
                                 "faint, inky, zero")),
    (["--steps", "20,x"], ("--steps: allowed comma-separated step counts", "'20,x'")),
])
def test_cli_errors_name_the_option(lora_env, capsys, argv, fragments):
    from tessera import cli

    assert cli.main(["lora-profile", str(lora_env["dir"]), "--base", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera lora-profile: error: ")
    assert all(f in err for f in fragments), err


def test_cli_refuses_an_empty_directory(tmp_path, capsys):
    from tessera import cli

    assert cli.main(["lora-profile", str(tmp_path), "--base", "/nonexistent"]) == 2
    assert "no adapters in" in capsys.readouterr().err


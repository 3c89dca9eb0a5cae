"""The adapter directory: both diffusers layouts, re-listing while serving, sizes, and K from profiles."""

from __future__ import annotations

import json
import logging
import os

import pytest

from tessera.errors import ConfigError
from tessera.lora_registry import WEIGHT_NAME, Layout, LoraProfile, LoraRegistry, load_profile, parse_profile


def write(path, data=b"x" * 10):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # the rename rule of the module docstring


def bump(path, seconds=5):
    """Move a directory's mtime into the past, so the next change gives a different one on any clock."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def test_lora_registry_weight_name_is_diffusers_default():
    """Read from the installed diffusers' source (importing it loads torch: seconds)."""
    import ast
    import importlib.util
    from pathlib import Path

    package = Path(importlib.util.find_spec("diffusers").submodule_search_locations[0])
    source = package / "loaders" / "lora_base.py"
    values = {t.id: n.value.value for n in ast.parse(source.read_text()).body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert WEIGHT_NAME == values["LORA_WEIGHT_NAME_SAFE"] == "pytorch_lora_weights.safetensors"


def test_lora_registry_lists_both_layouts(tmp_path):
    write(tmp_path / "outline.safetensors", b"a" * 123)
    write(tmp_path / "stripes" / WEIGHT_NAME, b"b" * 45)
    (tmp_path / "empty").mkdir()  # no weights: not an adapter
    write(tmp_path / "notes.txt")
    write(tmp_path / ".hidden.safetensors")  # not an adapter name
    write(tmp_path / "x.safetensors.tmp")  # being written
    reg = LoraRegistry(tmp_path, poll_interval_s=0)
    assert reg.names() == {"outline", "stripes"}
    assert reg.path("outline") == tmp_path / "outline.safetensors"
    assert reg.path("stripes") == tmp_path / "stripes" / WEIGHT_NAME
    assert reg.adapter("stripes").layout is Layout.DIR and reg.adapter("outline").layout is Layout.FILE
    assert reg.nbytes("outline") == 123 and reg.nbytes("stripes") == 45
    assert "outline" in reg and "empty" not in reg
    with pytest.raises(KeyError, match="'nosuch' is not in"):
        reg.path("nosuch")


def test_lora_registry_single_file_wins_over_directory(tmp_path):
    write(tmp_path / "dark.safetensors")
    write(tmp_path / "dark" / WEIGHT_NAME)
    assert LoraRegistry(tmp_path, poll_interval_s=0).path("dark") == tmp_path / "dark.safetensors"


def test_lora_registry_adapters_added_while_running_become_servable(tmp_path):
    write(tmp_path / "outline.safetensors")
    reg = LoraRegistry(tmp_path, poll_interval_s=0)
    assert reg.names() == {"outline"}
    write(tmp_path / "stripes.safetensors")  # a new file
    assert reg.names() == {"outline", "stripes"}
    (tmp_path / "dark").mkdir()  # a directory first, its weights later: only the subdirectory changes
    assert reg.names() == {"outline", "stripes"}
    bump(tmp_path)
    bump(tmp_path / "dark")
    reg.names()
    write(tmp_path / "dark" / WEIGHT_NAME)
    assert reg.names() == {"outline", "stripes", "dark"}
    os.remove(tmp_path / "outline.safetensors")  # removed ones go
    assert "outline" not in reg.names()


def test_lora_registry_relists_only_on_change(tmp_path):
    write(tmp_path / "outline.safetensors")
    write(tmp_path / "stripes" / WEIGHT_NAME)
    bump(tmp_path)
    bump(tmp_path / "stripes")  # not recent: the listing is not racy
    reg = LoraRegistry(tmp_path, poll_interval_s=0)
    scans = reg.scans
    for _ in range(5):
        assert reg.names() == {"outline", "stripes"}
    assert reg.scans == scans  # unchanged directory: no re-listing
    write(tmp_path / "dark.safetensors")
    assert "dark" in reg.names() and reg.scans == scans + 1


def test_lora_registry_recent_changes_are_relisted(tmp_path):
    """Within RACY_NS of a change the directory may change again in the same mtime tick: listed again."""
    write(tmp_path / "outline.safetensors")
    reg = LoraRegistry(tmp_path, poll_interval_s=0)
    scans = reg.scans
    reg.names()
    assert reg.scans == scans + 1
    st = tmp_path.stat()
    os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, a file sneaked in:
    (tmp_path / "late.safetensors").write_bytes(b"y")
    os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "late" in reg.names()


def test_lora_registry_poll_interval_throttles_checks(tmp_path):
    now = [0.0]
    write(tmp_path / "outline.safetensors")
    reg = LoraRegistry(tmp_path, poll_interval_s=1.0, clock=lambda: now[0])
    write(tmp_path / "stripes.safetensors")
    now[0] = 0.5
    assert reg.names() == {"outline"}  # not checked yet
    assert reg.names(refresh=True) == {"outline", "stripes"}
    write(tmp_path / "dark.safetensors")
    now[0] = 1.2
    assert reg.names() == {"outline", "stripes"}
    now[0] = 1.6
    assert "dark" in reg.names()


def test_lora_registry_off_and_missing_dir(tmp_path):
    assert LoraRegistry(None).names() == frozenset()
    with pytest.raises(ConfigError, match="lora_dir: not a directory"):
        LoraRegistry(tmp_path / "nope")


def test_lora_profile_rule():
    p = LoraProfile(((20, 4), (50, 10), (100, 40)))
    assert p.k_for(50) == 10 and p.k_for(20) == 4  # profiled
    assert p.k_for(10) == 2  # below the table: 4/20 of 10
    assert p.k_for(200) == 80  # above: 40/100 of 200
    assert p.k_for(30) == 6  # between 20 (0.2) and 50 (0.2): 0.2 x 30
    assert p.k_for(75) == 22  # fraction 0.2 + (0.4 - 0.2) x 25/50 = 0.3; 0.3 x 75 = 22.5 -> floor
    assert p.k_for(1) == 0 and p.k_for(0) == 0
    assert LoraProfile(((10, 10),)).k_for(7) == 7  # never beyond the steps


def test_lora_profile_parse_errors(tmp_path):
    profile = parse_profile({"k_by_steps": {"50": 10, "20": 4}, "cosine": [1.0]})
    assert profile.k_by_steps == ((20, 4), (50, 10))
    for bad in ({}, {"k_by_steps": {}}, {"k_by_steps": {"x": 1}}, {"k_by_steps": {"10": 11}},
                {"k_by_steps": {"10": -1}}, {"k_by_steps": {"10": 2.5}}, {"k_by_steps": {"0": 0}},
                {"k_by_steps": {"10": True}}, []):
        with pytest.raises(ConfigError, match="k_by_steps"):
            parse_profile(bad, "p.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="unreadable LoRA profile"):
        load_profile(tmp_path / "bad.json")


def test_lora_registry_k_for_reads_profiles_beside_adapters(tmp_path):
    write(tmp_path / "outline.safetensors")
    write(tmp_path / "stripes" / WEIGHT_NAME)
    write(tmp_path / "dark.safetensors")
    (tmp_path / "outline.profile.json").write_text(json.dumps({"k_by_steps": {"50": 10}}))
    (tmp_path / "stripes" / "profile.json").write_text(json.dumps({"k_by_steps": {"50": 20}}))
    reg = LoraRegistry(tmp_path, poll_interval_s=0)
    assert reg.adapter("outline").profile_path == tmp_path / "outline.profile.json"
    assert reg.adapter("stripes").profile_path == tmp_path / "stripes" / "profile.json"
    assert reg.k_for("outline", 50, default_k=3) == 10
    assert reg.k_for("outline", 25, default_k=3) == 5
    assert reg.k_for("stripes", 50, default_k=3) == 20
    assert reg.k_for("dark", 50, default_k=3) == 3  # no profile: the default
    assert reg.k_for("dark", 2, default_k=3) == 2  # clamped to the steps
    assert reg.profile("dark") is None
    # a rewritten profile is read again
    (tmp_path / "outline.profile.json").write_text(json.dumps({"k_by_steps": {"50": 12, "20": 2}}))
    assert reg.k_for("outline", 50, default_k=3) == 12


def test_lora_registry_malformed_profile_falls_back_with_one_warning(tmp_path, caplog):
    write(tmp_path / "outline.safetensors")
    (tmp_path / "outline.profile.json").write_text("{broken")
    reg = LoraRegistry(tmp_path, poll_interval_s=0)
    with pytest.raises(ConfigError):
        reg.profile("outline")
    with caplog.at_level(logging.WARNING, logger="tessera.lora_registry"):
        assert reg.k_for("outline", 50, default_k=7) == 7
        assert reg.k_for("outline", 50, default_k=7) == 7
    assert [r.getMessage().startswith("[tessera] LoRA profile ignored") for r in caplog.records] == [True]

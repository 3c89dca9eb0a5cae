"""End-to-end through the real tritonserver and tritonclient (HTTP and gRPC), tiny exported models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import PROMPT, SIZES, diffusers_image
from tessera.client import infer_image, infer_inputs, make_client, request_arrays

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request, server):
    protocol = request.param
    c = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
    yield protocol, c
    c.close()


@pytest.mark.parametrize("height, width", SIZES)
def test_serving_three_resolutions(client, height, width):
    protocol, c = client
    image = infer_image(c, protocol, request_arrays(PROMPT, height, width, steps=3, seed=5))
    assert image.shape == (1, height, width, 3) and image.dtype == np.uint8
    assert image.std() > 1.0, "not a constant image"


@pytest.mark.parametrize(
    "model, kind, height, width",
    [("txt2img", "unet", 128, 192), ("txt2img_local", "unet", 192, 128), ("dit_txt2img", "dit", 128, 192),
     ("dit_txt2img_sp2", "dit", 192, 128),  # sequence-parallel over two worker processes
     ("txt2img_pipelined", "unet", 128, 128)],  # decoded on its own thread beside the steps
)
def test_serving_equals_in_process_diffusers(server, diffusers_pipes, model, kind, height, width):
    """Served image == diffusers pipeline image from the same components, within 2/255 per pixel."""
    c = make_client("grpc", server.grpc_url)
    arrays = request_arrays(PROMPT, height, width, steps=8, guidance_scale=5.0, seed=1234, negative_prompt="dark")
    served = infer_image(c, "grpc", arrays, model=model)[0]
    ref = diffusers_image(diffusers_pipes[kind], PROMPT, height, width, 8, 5.0, 1234, negative="dark")
    c.close()
    diff = np.abs(served.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"max pixel diff {diff.max()}"


def test_serving_batch_of_two_and_no_cfg(server):
    c = make_client("http", server.http_url)
    images = infer_image(c, "http", request_arrays(["a", "b"], 64, 64, steps=2, guidance_scale=1.0, seed=[1, 2]))
    single = infer_image(c, "http", request_arrays("b", 64, 64, steps=2, guidance_scale=1.0, seed=2))
    c.close()
    assert images.shape == (2, 64, 64, 3)
    assert np.array_equal(images[1], single[0]), "batch items are independent requests"
    assert not np.array_equal(images[0], images[1])


def _arr(value, dtype):
    return np.array([[value]], dtype=dtype)


# (case id, the change to a valid request, the field the error must name)
INVALID = [
    ("height-small", {"height": _arr(32, np.int32)}, "height"),
    ("height-large", {"height": _arr(4096, np.int32)}, "height"),
    ("height-multiple", {"height": _arr(100, np.int32)}, "height"),
    ("width-multiple", {"width": _arr(136, np.int32)}, "width"),
    ("width-zero", {"width": _arr(0, np.int32)}, "width"),
    ("steps-zero", {"steps": _arr(0, np.int32)}, "steps"),
    ("steps-large", {"steps": _arr(100000, np.int32)}, "steps"),
    ("guidance-negative", {"guidance_scale": _arr(-2.0, np.float32)}, "guidance_scale"),
    ("guidance-nan", {"guidance_scale": _arr(np.nan, np.float32)}, "guidance_scale"),
    ("guidance-huge", {"guidance_scale": _arr(1e9, np.float32)}, "guidance_scale"),
    ("prompt-empty", {"prompt": _arr(b"", np.object_)}, "prompt"),
    ("prompt-tokens", {"prompt": _arr(("red circle " * 60).encode(), np.object_)}, "prompt"),
    ("prompt-bytes", {"prompt": _arr(b"x" * 5000, np.object_)}, "prompt"),
    ("prompt-utf8", {"prompt": _arr(b"\xff\xfe\xfd", np.object_)}, "prompt"),
    ("negative-tokens", {"negative_prompt": _arr(("blue " * 90).encode(), np.object_)}, "negative_prompt"),
    ("seed-negative", {"seed": _arr(-5, np.int64)}, "seed"),
    ("slo-zero", {"slo_ms": _arr(0, np.int32)}, "slo_ms"),
    ("sizes-differ", {"prompt": np.array([[b"a"], [b"b"]], np.object_),
                      "height": np.array([[64], [128]], np.int32), "width": np.array([[64], [64]], np.int32),
                      "steps": np.array([[2], [2]], np.int32), "guidance_scale": np.array([[1.0], [1.0]], np.float32),
                      "seed": np.array([[1], [2]], np.int64)}, "height"),
    # Checked by Triton itself against config.pbtxt, before the model runs:
    ("missing-height", {"height": None}, "height"),
    ("dtype-height", {"height": _arr(128.0, np.float32)}, "height"),
    ("shape-steps", {"steps": np.array([[2, 3]], np.int32)}, "steps"),
    ("batch-mismatch", {"seed": np.array([[1], [2]], np.int64)}, "seed"),
]


@pytest.mark.parametrize("case, change, field", INVALID, ids=[c[0] for c in INVALID])
def test_serving_invalid_input_is_invalid_arg_naming_field(client, case, change, field):
    from tritonclient.utils import InferenceServerException

    protocol, c = client
    arrays = request_arrays(PROMPT, 64, 64, steps=2, seed=1)
    for name, value in change.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    m = __import__(f"tritonclient.{protocol}", fromlist=["InferRequestedOutput"])
    with pytest.raises(InferenceServerException) as e:
        c.infer("txt2img", infer_inputs(protocol, arrays, declared_types=False), outputs=[m.InferRequestedOutput("image")])
    expected = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    assert e.value.status() == expected, f"{case}: {e.value.status()} {e.value.message()}"
    assert field in e.value.message(), e.value.message()


def test_serving_healthy_after_bad_input(server, client):
    protocol, c = client
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("txt2img")
    image = infer_image(c, protocol, request_arrays(PROMPT, 64, 64, steps=2, seed=1))
    assert image.shape == (1, 64, 64, 3)


def test_generate_cli_writes_png(server, tmp_path):
    from PIL import Image

    out = tmp_path / "x.png"
    cmd = [sys.executable, "-m", "tessera.cli", "generate", "--url", server.grpc_url, "--protocol", "grpc",
           "--prompt", PROMPT, "--height", "64", "--width", "128", "--steps", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert Image.open(out).size == (128, 64)
    bad = subprocess.run([*cmd[:-2], "--steps", "0", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3 and "steps" in bad.stderr


def test_metrics_count_requests_and_steps(server):
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()

    def value(prefix: str) -> float:
        rows = [ln for ln in text.splitlines() if ln.startswith(prefix)]
        assert rows, prefix
        return float(rows[0].split()[-1])

    assert value('tessera_requests_total{model="engine",outcome="completed"}') >= 1
    calls = value('tessera_denoiser_calls_total{model="engine"}')
    assert calls >= 1 and value('tessera_denoiser_rows_total{model="engine"}') >= calls
    assert value('tessera_steps_total{model="engine"}') >= value('tessera_engine_steps_total{model="engine"}')

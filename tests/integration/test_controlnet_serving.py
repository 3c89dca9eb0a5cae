"""ControlNets through the real server (issue 15) on the committed heavy reference and its two reference
ControlNets (`quality_models/controlnet`, exported as the shared models controlnet_silhouette and
controlnet_box, the UNet also as ref_denoiser_encoder + ref_denoiser_decoder):
- a served image with one and with two ControlNets, ControlNets beside the encoder (ref_engine), one
  after another (ref_engine_cn_serial), and beside it as calls to the shared Triton models over BLS
  (ref_engine_cn_bls), equals diffusers' StableDiffusionControlNetPipeline over the same components
  within 2/255;
- more ControlNets than the service keeps resident (ref_engine_cn_one holds one): every request served,
  each image unchanged by the evictions and reloads, which the metrics count;
- async mode serves (its fidelity is measured in perf/results/controlnet_quality.json);
- bad ControlNet inputs are INVALID_ARG naming the field, through the entry model and the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import metric, wait_for
from tessera.client import infer_image, make_client, request_arrays
from test_engine_serving import Stream

pytestmark = pytest.mark.integration
REFERENCE = Path(__file__).resolve().parents[2] / "quality_models"
H = W = 64
STEPS, GUIDANCE = 8, 4.0
PROMPT = "a red circle at top left"  # the maps put the object at bottom right

if not (REFERENCE / "controlnet" / "box").is_dir():
    pytest.skip("the reference ControlNets are not in quality_models/controlnet", allow_module_level=True)


def control_maps(seed: int = 3) -> dict[str, np.ndarray]:
    from tessera.quality.shapes import Label
    from tessera.quality.train_controlnet import scene

    label = Label(0, 0, 3)  # red circle at bottom right
    return {kind: scene(label, H, W, np.random.default_rng(seed), kind)[1] for kind in ("silhouette", "box")}


def served(server, model: str, requests: list[tuple[list[str], int]]) -> list[np.ndarray]:
    """Every request on one stream at once (they share steps): (controlnet names, seed) -> images in order."""
    maps = control_maps()
    s = Stream(server)
    try:
        for i, (names, seed) in enumerate(requests):
            control = {}
            if names:
                control = {"controlnet": ",".join(names),
                           "control_image": np.concatenate([np.repeat(maps[n][..., None], 3, axis=2) for n in names],
                                                           axis=2)}
            s.send(model, request_arrays(PROMPT, H, W, STEPS, GUIDANCE, seed, **control), str(i))
        out = s.images(len(requests), timeout_s=300)
    finally:
        s.close()
    return [out[str(i)] for i in range(len(requests))]


@pytest.fixture(scope="module")
def diffusers_controlled(repo):
    """diffusers' StableDiffusionControlNetPipeline over the heavy reference and the ControlNets as exported."""
    from diffusers import ControlNetModel

    from tessera.quality.train_controlnet import generate_controlled
    from tessera.quality.train_lora import load_reference

    pipe = load_reference(REFERENCE / "heavy")
    nets = {k: ControlNetModel.from_pretrained(repo / f"controlnet_{k}" / "1" / "torch").eval()
            for k in ("silhouette", "box")}
    maps = control_maps()

    def generate(names: list[str], seed: int) -> np.ndarray:
        return generate_controlled(pipe, [nets[n] for n in names], [PROMPT], [maps[n][None] for n in names],
                                   seed, STEPS, GUIDANCE)[0]

    return generate


@pytest.mark.parametrize("model", ["ref_engine", "ref_engine_cn_serial", "ref_engine_cn_bls"])
def test_served_controlnet_images_equal_diffusers(server, diffusers_controlled, model):
    requests = [(["silhouette"], 11), (["silhouette", "box"], 12), ([], 13)]
    images = served(server, model, requests)
    for (names, seed), image in zip(requests[:2], images[:2], strict=True):
        want = diffusers_controlled(names, seed)
        diff = np.abs(image.astype(int) - want.astype(int)).max()
        assert diff <= 2, f"{model} {names}: max diff {diff}/255"
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0  # the second ControlNet counts
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() > 0  # and the first
    # request 1 alone makes 2 calls a step (silhouette, box); request 0 shares them or adds its own
    wait_for(lambda: metric(server, "tessera_controlnet_calls_total", model) >= 2 * STEPS, 30, "calls counted")


def test_more_controlnets_than_resident_are_all_served_unchanged(server):
    model = "ref_engine_cn_one"
    loads0 = metric(server, "tessera_controlnet_loads_total", model)
    # one at a time: each request evicts the other ControlNet and loads its own again
    alone = [served(server, model, [(names, 21)])[0] for names in (["silhouette"], ["box"], ["silhouette"], ["box"])]
    assert np.array_equal(alone[0], alone[2]) and np.array_equal(alone[1], alone[3])
    # at once: both pinned by running requests, over the count, every request served with the same images
    together = served(server, model, [(["silhouette"], 21), (["box"], 21), (["silhouette", "box"], 22),
                                      (["box"], 21)])
    assert np.array_equal(together[0], alone[0]) and np.array_equal(together[1], alone[1])
    assert np.array_equal(together[3], alone[1])
    wait_for(lambda: metric(server, "tessera_controlnet_loads_total", model) - loads0 >= 4, 30, "loads counted")
    assert metric(server, "tessera_controlnet_evictions_total", model) >= 3
    assert metric(server, "tessera_controlnet_resident", model) <= 1  # back under the count once unpinned


def test_async_mode_serves_close_to_sync(server):
    sync, = served(server, "ref_engine", [(["silhouette"], 31)])
    late, = served(server, "ref_engine_cn_async", [(["silhouette"], 31)])
    assert late.shape == sync.shape
    mse = np.mean((late.astype(float) - sync.astype(float)) ** 2)
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 15  # the previous step's residuals: close, not exact


@pytest.mark.parametrize("model", ["ref_txt2img", "ref_engine"])
@pytest.mark.parametrize("names,shape,scale,field", [
    ("nope", (H, W), None, "controlnet"),  # not served
    ("box", (32, W), None, "control_image"),  # not the image's size
    ("box", (H, W), 3.0, "control_scale"),  # out of range
    ("box", None, None, "control_image"),  # missing
])
def test_bad_control_inputs_name_the_field(server, model, names, shape, scale, field):
    from tritonclient.utils import InferenceServerException

    image = None if shape is None else np.zeros(shape, np.uint8)
    arrays = request_arrays(PROMPT, H, W, 2, GUIDANCE, 0, controlnet=names, control_image=image, control_scale=scale)
    if model == "ref_engine":
        s = Stream(server)
        s.send(model, arrays, "bad")
        _, error = s.get()
        s.close()
        message = str(error)
    else:
        with pytest.raises(InferenceServerException) as e:
            infer_image(make_client("grpc", server.grpc_url), "grpc", arrays, model)
        message = str(e.value)
    assert f"{field}:" in message and "allowed" in message, message

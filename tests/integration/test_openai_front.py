"""The OpenAI-compatible images API (`tessera openai`) with the official `openai` client against the real
server: two sizes, n=2, a stream with partial images, a disconnect that leaves no engine state behind, and
invalid requests answered with OpenAI error objects naming the parameter."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import numpy as np
import pytest

from conftest import PROMPT, metric, wait_for
from tessera.client import infer, make_client, request_arrays

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
MODEL = "engine"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def front(server):
    """`tessera openai` in a thread of this process (uvicorn on its own event loop), pointed at the server."""
    import uvicorn

    from tessera.openai_front import FrontDefaults, TritonImages, create_app

    port = _free_port()
    holder = {}

    def run():
        async def serve():
            triton = TritonImages(server.grpc_url, MODEL)
            holder["server"] = uvicorn.Server(uvicorn.Config(
                create_app(triton, FrontDefaults(size=(128, 128), steps=8)), host="127.0.0.1", port=port,
                log_level="warning"))
            try:
                await holder["server"].serve()
            finally:
                await triton.close()

        asyncio.run(serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: holder.get("server") is not None and holder["server"].started, 30, "the front to start")
    yield f"http://127.0.0.1:{port}"
    holder["server"].should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def oai(front):
    return openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=120)


def decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def direct(server, height, width, steps, seed, guidance=5.0) -> np.ndarray:
    client = make_client("grpc", server.grpc_url)
    try:
        image, _ = infer(client, "grpc", request_arrays(PROMPT, height, width, steps, guidance, seed))
    finally:
        client.close()
    return image[0]


@pytest.mark.parametrize("size", ["128x128", "192x128"])
def test_openai_generation_at_two_sizes_equals_triton(server, oai, size):
    width, height = map(int, size.split("x"))
    result = oai.images.generate(model=MODEL, prompt=PROMPT, size=size, response_format="b64_json",
                                 extra_body={"seed": 3, "num_inference_steps": 6, "guidance_scale": 5.0})
    assert result.size == size and len(result.data) == 1
    image = decode(result.data[0].b64_json)
    assert image.shape == (height, width, 3)
    # the same request straight to the engine: the front adds nothing to the numbers
    assert np.array_equal(image, direct(server, height, width, 6, 3))


def test_openai_n2_gives_seed_and_seed_plus_one(server, oai):
    result = oai.images.generate(prompt=PROMPT, n=2, size="128x128",
                                 extra_body={"seed": 10, "num_inference_steps": 4})
    images = [decode(d.b64_json) for d in result.data]
    assert len(images) == 2 and not np.array_equal(images[0], images[1])
    assert np.array_equal(images[0], direct(server, 128, 128, 4, 10))
    assert np.array_equal(images[1], direct(server, 128, 128, 4, 11))


def test_openai_stream_sends_partial_images_then_the_image(server, oai):
    events = list(oai.images.generate(prompt=PROMPT, size="128x128", stream=True, partial_images=3,
                                      extra_body={"seed": 5, "num_inference_steps": 8}))
    kinds = [e.type for e in events]
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(partial) >= 2 and kinds[-1] == "image_generation.completed" and kinds.count(kinds[-1]) == 1
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    assert all(decode(e.b64_json).shape == (128, 128, 3) for e in partial)
    assert np.array_equal(decode(events[-1].b64_json), direct(server, 128, 128, 8, 5))


def post(front: str, body: dict, timeout_s: float = 60.0):
    """A raw POST (http.client): (connection, response) — the caller reads or drops the response."""
    import http.client
    import json
    from urllib.parse import urlparse

    url = urlparse(front)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse


def front_in_flight(front: str) -> int:
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(front + "/health", timeout=5).read())["in_flight"]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_disconnect_cancels_and_leaves_no_engine_state(server, front, stream):
    cancelled = metric(server, "tessera_requests_total", MODEL, outcome="cancelled")
    body = {"prompt": PROMPT, "size": "256x256", "stream": stream, "partial_images": 1 if stream else 0,
            "num_inference_steps": 200, "seed": 1}
    conn, response = post(front, body, timeout_s=1.0 if not stream else 60.0)
    if stream:
        r = response()
        assert r.status == 200
        assert r.readline().startswith(b"event: image_generation.partial_image")  # steps have run; go away
    else:
        with pytest.raises(TimeoutError):
            response()
    conn.sock.close()
    conn.close()
    wait_for(lambda: metric(server, "tessera_requests_total", MODEL, outcome="cancelled") == cancelled + 1, 60,
             "the engine to count the cancellation")
    wait_for(lambda: metric(server, "tessera_in_flight_requests", MODEL) == 0, 30, "no request in flight")
    wait_for(lambda: front_in_flight(front) == 0, 30, "the front to release the generation")
    completed = metric(server, "tessera_requests_total", MODEL, outcome="completed")
    time.sleep(0.5)
    assert metric(server, "tessera_requests_total", MODEL, outcome="completed") == completed  # nothing finished it


INVALID = [  # (extra body or argument changes, the parameter named, HTTP status)
    ({"bogus": 1}, "bogus", 400),
    ({"prompt": None}, "prompt", 400),
    ({"prompt": 7}, "prompt", 400),
    ({"prompt": "\u200b\x00"}, "prompt", 400),  # no visible character (the engine's check)
    ({"n": 0}, "n", 400),
    ({"n": 11}, "n", 400),
    ({"n": "2"}, "n", 400),
    ({"size": "big"}, "size", 400),
    ({"size": "100x100"}, "size", 400),  # not a multiple of 16 (the engine's check, named `height` there)
    ({"size": "4096x4096"}, "size", 400),
    ({"response_format": "url"}, "response_format", 400),
    ({"num_inference_steps": 0}, "num_inference_steps", 400),
    ({"guidance_scale": "high"}, "guidance_scale", 400),
    ({"seed": -1}, "seed", 400),
    ({"model": "no_such_model"}, "model", 400),
    ({"partial_images": 2}, "partial_images", 400),  # without stream
    ({"quality": "hd"}, "quality", 400),
    ({"output_format": "jpeg"}, "output_format", 400),
    ({"lora": "stripes:0.8"}, "lora", 400),  # the engine serves no adapters (yet): it says so, naming lora
    ({"slo_ms": 1, "model": "cold_rounds"}, "slo_ms", 429),  # a deadline policy cannot meet it: refused
]


@pytest.mark.parametrize("change,param,status", INVALID, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(INVALID)])
def test_openai_invalid_requests_are_error_objects_naming_the_parameter(front, change, param, status):
    import json

    body = {"prompt": PROMPT, "size": "128x128", "num_inference_steps": 4} | change
    body = {k: v for k, v in body.items() if v is not None}
    conn, response = post(front, body)
    r = response()
    text = r.read().decode()
    conn.close()
    assert r.status == status, text[:300]
    error = json.loads(text)["error"]
    assert error["param"] == param and error["message"].startswith(param + ":")
    assert set(error) == {"message", "type", "param", "code"}


def test_openai_client_raises_typed_errors_and_lists_models(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(prompt=PROMPT, size="100x100")
    assert e.value.status_code == 400 and e.value.param == "size"
    ids = [m.id for m in oai.models.list().data]
    assert front_in_flight(oai.base_url.scheme + "://" + oai.base_url.host + f":{oai.base_url.port}") == 0
    assert ids[0] == MODEL and "ref_engine" in ids and "txt2img" not in ids

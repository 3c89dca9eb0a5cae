"""The step engine through the real server: streaming progress, continuous batching across requests,
cancellation of many streamed requests, exact patch batching, all over tritonclient gRPC."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from conftest import PROMPT, metric, wait_for
from tessera.client import infer_image, infer_inputs, make_client, request_arrays

pytestmark = pytest.mark.integration


class Stream:
    """One gRPC stream; responses land in a queue tagged with the request id."""

    def __init__(self, server):
        self.client = make_client("grpc", server.grpc_url)
        self.q: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def send(self, model: str, arrays: dict, request_id: str, progress=False, preview=False) -> None:
        arrays = dict(arrays)
        if progress:
            arrays["progress"] = np.array([[True]])
        if preview:
            arrays["preview"] = np.array([[True]])
        self.client.async_stream_infer(model, infer_inputs("grpc", arrays, declared_types=False),
                                       request_id=request_id, enable_empty_final_response=True)

    def get(self, timeout_s: float = 120.0):
        return self.q.get(timeout=timeout_s)

    def images(self, n: int, timeout_s: float = 120.0) -> dict[str, np.ndarray]:
        """The final images of the n requests sent on this stream, by request id (an error fails the test)."""
        out: dict[str, np.ndarray] = {}
        while len(out) < n:
            result, error = self.get(timeout_s)
            assert error is None, str(error)
            image = result.as_numpy("image")
            if image is not None:
                out[result.get_response().id] = image[0]
        return out

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def test_stream_progress_then_one_final_image(server):
    s = Stream(server)
    s.send("engine", request_arrays(PROMPT, 64, 128, steps=5, seed=3), "p1", progress=True, preview=True)
    steps, image, finals = [], None, 0
    while True:
        result, error = s.get()
        assert error is None, error
        out = result.as_numpy("step")
        if out is not None:
            steps.append(int(out[0, 0]))
        if result.as_numpy("preview") is not None:
            assert result.as_numpy("preview").shape == (1, 8, 16, 3)
        if result.as_numpy("image") is not None:
            image = result.as_numpy("image")
        if is_final(result):
            finals += 1
            break
    s.close()
    assert steps == [1, 2, 3, 4, 5] and finals == 1
    assert image.shape == (1, 64, 128, 3)
    plain = infer_image(make_client("http", server.http_url), "http", request_arrays(PROMPT, 64, 128, steps=5, seed=3))
    assert np.array_equal(plain, image), "streaming does not change the image"


def test_continuous_batching_request_joins_mid_way(server):
    before = metric(server, "tessera_mixed_step_calls_total", "engine")
    s = Stream(server)
    s.send("engine", request_arrays(PROMPT, 128, 128, steps=30, seed=1), "long", progress=True)
    while True:  # wait until the long request is mid-way
        result, error = s.get()
        assert error is None
        if result.as_numpy("step") is not None and int(result.as_numpy("step")[0, 0]) >= 3:
            break
    short = infer_image(make_client("grpc", server.grpc_url), "grpc", request_arrays(PROMPT, 64, 64, steps=4, seed=2))
    assert short.shape == (1, 64, 64, 3)
    while not is_final(s.get()[0]):
        pass
    s.close()
    # metrics are applied on their own thread: wait until they have caught up with both finals
    wait_for(lambda: metric(server, "tessera_mixed_step_calls_total", "engine") - before >= 4,
             timeout_s=10, what="the short request's 4 steps shared with the long one at other step indices")


def test_cancel_100_streamed_requests_mid_denoise(server):
    model = "engine_wide"
    keep_arrays = [request_arrays(PROMPT, 64, 64, steps=30, seed=11), request_arrays(PROMPT, 64, 128, steps=30, seed=12)]
    reference = [infer_image(make_client("grpc", server.grpc_url), "grpc", a, model="txt2img") for a in keep_arrays]
    cancelled_before = metric(server, "tessera_requests_total", model, outcome="cancelled")
    keeper = Stream(server)
    for i, a in enumerate(keep_arrays):
        keeper.send(model, a, f"keep{i}")
    doomed = Stream(server)
    for i in range(100):
        doomed.send(model, request_arrays(PROMPT, 64, 64, steps=40, guidance_scale=1.0, seed=100 + i), f"c{i}",
                    progress=True)
    started = set()
    while len(started) < 100:  # every doomed request has taken at least one step
        result, error = doomed.get()
        assert error is None, error.message()
        started.add(result.get_response().id)
    doomed.close(cancel=True)
    wait_for(lambda: metric(server, "tessera_requests_total", model, outcome="cancelled") - cancelled_before >= 100,
             what="100 cancellations")
    images = {}
    while len(images) < 2:
        result, error = keeper.get()
        assert error is None, error
        if result.as_numpy("image") is not None:
            images[result.get_response().id] = result.as_numpy("image")
    keeper.close()
    wait_for(lambda: metric(server, "tessera_in_flight_requests", model) == 0, what="no engine state left")
    assert metric(server, "tessera_requests_total", model, outcome="cancelled") - cancelled_before == 100
    for i in range(2):
        assert np.abs(images[f"keep{i}"].astype(int) - reference[i].astype(int)).max() <= 1


def test_exact_patches_engine_serves_mixed_resolutions_like_concat(server):
    c = make_client("grpc", server.grpc_url)
    calls_before = metric(server, "tessera_denoiser_calls_total", "engine_patches")
    done_before = metric(server, "tessera_requests_total", "engine_patches", outcome="completed")
    sizes = [(64, 64), (64, 128), (128, 64)]
    s = Stream(server)
    for i, (h, w) in enumerate(sizes):
        s.send("engine_patches", request_arrays(PROMPT, h, w, steps=6, seed=i), f"x{i}")
    patched = {}
    while len(patched) < 3:
        result, error = s.get()
        assert error is None, error
        if result.as_numpy("image") is not None:
            patched[result.get_response().id] = result.as_numpy("image")
    s.close()
    for i, (h, w) in enumerate(sizes):
        ref = infer_image(c, "grpc", request_arrays(PROMPT, h, w, steps=6, seed=i), model="txt2img")
        assert np.abs(patched[f"x{i}"].astype(int) - ref.astype(int)).max() <= 2
    # the metrics thread applies each final's step totals with its outcome: wait for the third
    wait_for(lambda: metric(server, "tessera_requests_total", "engine_patches", outcome="completed") - done_before == 3,
             timeout_s=10, what="the metrics of the three finals")
    res = metric(server, "tessera_denoiser_resolutions_total", "engine_patches")
    calls = metric(server, "tessera_denoiser_calls_total", "engine_patches") - calls_before
    assert calls <= 6 + 2 and res > calls, "mixed resolutions shared denoiser calls"


def test_cfg_parallel_engine_serves_the_same_images(server):
    """engine_cfg2 (cfg_parallel=on): each denoiser call's rows as two halves at once, in-process."""
    c = make_client("grpc", server.grpc_url)
    for h, w, seed in ((64, 64, 1), (64, 128, 2)):
        arrays = request_arrays(PROMPT, h, w, steps=6, seed=seed)
        s = Stream(server)
        s.send("engine_cfg2", arrays, "cfg2")
        while (result := s.get())[0] is None or result[0].as_numpy("image") is None:
            assert result[1] is None, result[1]
        s.close()
        split = result[0].as_numpy("image")
        whole = infer_image(c, "grpc", arrays, model="txt2img_local")
        assert split.shape == whole.shape and np.abs(split.astype(int) - whole.astype(int)).max() <= 1

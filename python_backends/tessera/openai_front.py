"""`tessera openai`: an OpenAI-compatible images API in front of a running Tessera server.

`POST /v1/images/generations` and `GET /v1/models`, as OpenAI's clients expect them, plus the extensions
vLLM-Omni and SGLang Diffusion accept (`negative_prompt`, `seed`, `num_inference_steps`,
`guidance_scale`) and Tessera's own (`slo_ms`, `early_exit`). Each image is one request to a decoupled
engine model over one gRPC stream per HTTP request, so

- `stream: true` relays the engine's progress stream as server-sent events: `partial_images` previews
  (`image_generation.partial_image`) and one `image_generation.completed` event per image;
- a client that disconnects cancels its Triton requests (the engine drops them at its next step);
- errors are OpenAI error objects: 400 naming the parameter, 429 when the server refuses for capacity
  (overloaded, or the deadline cannot be met), 503 when it is unreachable or shutting down, 500 else.

Validation here covers what only this API has (types, `size` syntax, `n`, `response_format`, unknown
parameters); ranges are the engine's (its limits come from the exported pipeline) and its errors name
Triton's inputs, which are mapped back to this API's parameter names.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request  # at module level: FastAPI reads the handlers' annotations by name

from .errors import (
    DeadlineUnreachableError, InvalidInputError, OverloadedError, ShutdownError, from_message,
)
from .wire import ENGINE_MODEL, OUTPUT_IMAGE, OUTPUT_PREVIEW, OUTPUT_STEPS

log = logging.getLogger("tessera.openai")

MAX_N = 10  # OpenAI's limit for n
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit for partial_images
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Triton input name (as the engine's errors name it) -> this API's parameter
_PARAM_OF_INPUT = {"height": "size", "width": "size", "steps": "num_inference_steps"}


@dataclass(frozen=True, slots=True)
class FrontDefaults:
    """What a request that leaves a parameter out gets."""

    size: tuple[int, int] = (256, 256)  # (width, height): what "auto" or no size means
    steps: int = 20
    guidance_scale: float = 5.0


class ApiError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Disconnected(Exception):
    """The HTTP client went away; its Triton requests have been cancelled."""


def invalid(param: str, problem: str, allowed: str, got: object) -> ApiError:
    return ApiError(400, str(InvalidInputError(param, problem, allowed, got)), param, "invalid_value")


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """One validated `POST /v1/images/generations` body."""

    prompt: str
    model: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None
    slo_ms: int | None = None
    early_exit: bool | None = None
    lora: str | None = None  # "name" or "name:scale", comma-separated (the engine checks the names)
    controlnet: str | None = None  # ControlNet names, comma-separated (the engine checks them)
    control_image: np.ndarray | None = None  # uint8 [H, W, C]: the decoded control image(s), channels stacked
    control_scale: tuple[float, ...] | None = None
    stream: bool = False
    partial_images: int = 0

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


# parameter -> (allowed values, or None for any) for OpenAI parameters accepted without effect here
_ACCEPTED_ONLY = {
    "user": None, "safety_identifier": None, "moderation": ("auto", "low"),
    "quality": ("auto", "standard"), "background": ("auto", "opaque"), "output_format": ("png",),
}
_KNOWN = {"prompt", "model", "n", "size", "response_format", "stream", "partial_images", "negative_prompt", "seed",
          "num_inference_steps", "guidance_scale", "slo_ms", "early_exit", "lora", "controlnet", "control_image", "control_scale", *_ACCEPTED_ONLY}


def _typed(body: Mapping, name: str, kinds: tuple[type, ...], label: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise invalid(name, "wrong type", label, value)
    return value


def _int(body: Mapping, name: str, lo: int, hi: int, default: int | None) -> int | None:
    value = _typed(body, name, (int,), "an integer", default)
    if value is not None and not lo <= value <= hi:
        raise invalid(name, "out of range", f"[{lo}, {hi}]", value)
    return value


def parse_generation(body: object, defaults: FrontDefaults = FrontDefaults(),
                     seed_source: Callable[[], int] = lambda: secrets.randbelow(2**31)) -> ImageRequest:
    """A JSON body -> ImageRequest, or ApiError(400) naming the first parameter that is wrong."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "request body: must be a JSON object", None, "invalid_json")
    if unknown := sorted(set(body) - _KNOWN):
        raise ApiError(400, f"{unknown[0]}: unknown parameter; allowed {', '.join(sorted(_KNOWN))}", unknown[0],
                       "unknown_parameter")
    for name, allowed in _ACCEPTED_ONLY.items():
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise invalid(name, "wrong type", "a string", value)
        if value is not None and allowed is not None and value not in allowed:
            raise invalid(name, "not supported", ", ".join(allowed), value)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", "missing" if prompt is None else "wrong type", "a non-empty string", prompt)
    fmt = _typed(body, "response_format", (str,), "a string", "b64_json")
    if fmt != "b64_json":
        raise invalid("response_format", "not supported", "b64_json", fmt)
    size = _typed(body, "size", (str,), "a string 'WIDTHxHEIGHT' or 'auto'", "auto")
    if size == "auto":
        width, height = defaults.size
    elif m := _SIZE.match(size):
        width, height = int(m.group(1)), int(m.group(2))
    else:
        raise invalid("size", "not 'WIDTHxHEIGHT'", "'WIDTHxHEIGHT' (e.g. '256x256') or 'auto'", size)
    stream = _typed(body, "stream", (bool,), "true or false", False)
    partial = _int(body, "partial_images", 0, MAX_PARTIAL_IMAGES, 0)
    if partial and not stream:
        raise invalid("partial_images", "needs stream", "0 unless stream is true", partial)
    guidance = _typed(body, "guidance_scale", (int, float), "a number", defaults.guidance_scale)
    if not np.isfinite(guidance):
        raise invalid("guidance_scale", "not finite", "a finite number", guidance)
    seed = _int(body, "seed", 0, 2**63 - 1 - MAX_N, None)
    negative = _typed(body, "negative_prompt", (str,), "a string")
    lora = body.get("lora")
    if isinstance(lora, list) and all(isinstance(x, str) for x in lora):
        lora = ",".join(lora)
    elif lora is not None and not isinstance(lora, str):
        raise invalid("lora", "wrong type", "'name[:scale]' or a list of them", lora)
    controlnet, control_image, control_scale = _control(body)
    return ImageRequest(
        prompt=prompt, model=_typed(body, "model", (str,), "a model id from GET /v1/models"),
        n=_int(body, "n", 1, MAX_N, 1), width=width, height=height,
        steps=_typed(body, "num_inference_steps", (int,), "an integer", defaults.steps),
        guidance_scale=float(guidance), seed=seed_source() if seed is None else seed, negative_prompt=negative,
        slo_ms=_typed(body, "slo_ms", (int,), "an integer (milliseconds)"),
        early_exit=_typed(body, "early_exit", (bool,), "true or false"), lora=lora, controlnet=controlnet,
        control_image=control_image, control_scale=control_scale, stream=stream, partial_images=partial,
    )


def _control(body: Mapping) -> tuple[str | None, np.ndarray | None, tuple[float, ...] | None]:
    """`controlnet` (a name or a list), `control_image` (a base64 PNG, or one per ControlNet: decoded and
    stacked along channels, RGB each), `control_scale` (a number or a list). Sizes, names and ranges are the
    engine's to check (its errors come back as 400 naming the parameter)."""
    names = body.get("controlnet")
    if isinstance(names, list) and names and all(isinstance(x, str) for x in names):
        names = ",".join(names)
    elif names is not None and not isinstance(names, str):
        raise invalid("controlnet", "wrong type", "a ControlNet name or a list of them", names)
    raw = body.get("control_image")
    image = None
    if raw is not None:
        items = raw if isinstance(raw, list) else [raw]
        if not items or not all(isinstance(x, str) for x in items):
            raise invalid("control_image", "wrong type", "a base64 PNG, or a list of them (one per controlnet)", raw)
        decoded = [_png(x) for x in items]
        if len(decoded) > 1:
            decoded = [np.repeat(d, 3, axis=2) if d.shape[2] == 1 else d for d in decoded]
            if len({d.shape[:2] for d in decoded}) > 1:
                raise invalid("control_image", "images of different sizes", "one size", [d.shape[:2] for d in decoded])
        image = np.concatenate(decoded, axis=2)
    scale = body.get("control_scale")
    scales = None
    if scale is not None:
        values = scale if isinstance(scale, list) else [scale]
        if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            raise invalid("control_scale", "wrong type", "a number or a list of numbers", scale)
        scales = tuple(float(x) for x in values)
    return names, image, scales


MAX_CONTROL_EDGE = 4096  # far above any served size; the engine checks the exact size


def _png(data: str) -> np.ndarray:
    """A base64 PNG (or JPEG) -> uint8 [H, W, 1] (greyscale) or [H, W, 3]."""
    import binascii

    from PIL import Image

    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        if max(img.size) > MAX_CONTROL_EDGE:  # the header only: refused before decoding
            raise invalid("control_image", "too large", f"at most {MAX_CONTROL_EDGE} pixels a side", list(img.size))
        img.load()
    except ApiError:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise invalid("control_image", "not a base64 image", "a base64-encoded PNG", f"{type(e).__name__}") from e
    arr = np.asarray(img.convert("L") if img.mode in ("L", "1", "I", "I;16") else img.convert("RGB"), np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def api_error_of(message: str) -> ApiError:
    """An engine error message (tagged by tessera.errors.wire_message) -> the OpenAI error it is answered with;
    the message starts with the parameter it names, in this API's terms."""
    cls = from_message(message)
    text = re.sub(r"( \[request id: [^\]]*\])? \[tessera:[a-z_]+\]$", "", message)  # ids are the front's own
    if cls is None:  # untagged: Triton's own (unknown model, unreachable, ...)
        return ApiError(503, f"server: {text}", None, "unavailable", "server_error")
    if issubclass(cls, InvalidInputError):
        name = text.split(":", 1)[0]
        param, status, code, kind = _PARAM_OF_INPUT.get(name, name), 400, "invalid_value", "invalid_request_error"
    elif issubclass(cls, DeadlineUnreachableError):
        param, status, code, kind = "slo_ms", 429, cls.code, "rate_limit_error"
    elif issubclass(cls, OverloadedError):
        param, status, code, kind = None, 429, cls.code, "rate_limit_error"
    elif issubclass(cls, ShutdownError):
        param, status, code, kind = None, 503, cls.code, "server_error"
    else:
        param, status, code, kind = None, 500, cls.code, "server_error"
    if param is not None and not text.startswith(param + ":"):
        text = f"{param}: {text}"
    return ApiError(status, text, param, code, kind)


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def upscale(preview: np.ndarray, height: int, width: int) -> np.ndarray:
    """A latent-resolution preview [h, w, 3] -> the requested size (nearest), as OpenAI's partial images are."""
    rows = np.arange(height) * preview.shape[0] // height
    cols = np.arange(width) * preview.shape[1] // width
    return preview[rows][:, cols]


def partial_marks(steps: int, partial_images: int) -> list[int]:
    """The step counts after which a partial image is sent: evenly spread, never the last step."""
    return sorted({max(1, round(steps * (i + 1) / (partial_images + 1))) for i in range(partial_images)} - {steps})


@dataclass(slots=True)
class Event:
    """One thing the engine said about one image of a request."""

    index: int  # which of the request's n images
    step: int
    image: np.ndarray | None = None  # final image [H, W, 3]
    preview: np.ndarray | None = None  # latent-resolution preview
    final: bool = False


@dataclass(slots=True)
class Generation:
    """The Triton requests of one HTTP request on one gRPC stream. `close()` (idempotent) cancels what is
    still unanswered and runs `on_close` once, however the HTTP exchange ended."""

    events: AsyncIterator[Event]
    cancel: Callable[[], None]
    n: int
    done: set[int] = field(default_factory=set)
    on_close: Callable[[], None] | None = None
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if len(self.done) < self.n:
            self.cancel()
        if self.on_close is not None:
            self.on_close()


class TritonImages:
    """The engine side: one shared aio gRPC channel, one stream per generation."""

    def __init__(self, url: str, model: str = ENGINE_MODEL):
        import tritonclient.grpc.aio as grpcclient

        self.url, self.default_model = url, model
        self.client = grpcclient.InferenceServerClient(url=url)
        self._engines: tuple[float, list[str]] = (0.0, [])

    async def engines(self, max_age_s: float = 5.0) -> list[str]:
        """Ready decoupled models that take a progress input (Tessera engines), the default first."""
        at, names = self._engines
        if time.monotonic() - at < max_age_s:
            return names
        index = await self.client.get_model_repository_index(as_json=True)
        names = []
        for m in index.get("models", []):
            if m.get("state") != "READY":
                continue
            config = (await self.client.get_model_config(m["name"], as_json=True)).get("config", {})
            decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
            if decoupled and any(i.get("name") == "progress" for i in config.get("input", [])):
                names.append(m["name"])
        names.sort(key=lambda n: (n != self.default_model, n))
        self._engines = (time.monotonic(), names)
        return names

    async def resolve(self, model: str | None) -> str:
        names = await self.engines()
        if model is None and self.default_model in names:
            return self.default_model
        if model in names:
            return model
        if model is not None and model in await self.engines(max_age_s=0.0):
            return model
        allowed = ", ".join(names) or "none ready"
        if model is None:
            raise ApiError(503, f"model: the default model {self.default_model!r} is not ready; allowed {allowed}",
                           "model", "model_not_ready", "server_error")
        raise ApiError(400, f"model: unknown model; allowed {allowed}, got {model!r}", "model", "model_not_found")

    def start(self, req: ImageRequest, model: str) -> Generation:
        from .client import infer_inputs, request_arrays

        stream_on = req.stream

        async def requests():
            for i in range(req.n):
                arrays = request_arrays(req.prompt, req.height, req.width, req.steps, req.guidance_scale, req.seed + i,
                                        req.negative_prompt, req.slo_ms, req.early_exit, req.lora, req.controlnet,
                                        req.control_image, list(req.control_scale) if req.control_scale else None)
                arrays |= {"progress": np.array([[stream_on]]), "preview": np.array([[req.partial_images > 0]])}
                yield {"model_name": model, "inputs": infer_inputs("grpc", arrays), "request_id": str(i)}
            await closed.wait()  # keep the stream open until every image is answered (or cancelled)

        closed = asyncio.Event()
        it = self.client.stream_infer(requests())

        async def events() -> AsyncIterator[Event]:
            try:
                async for result, error in it:
                    if error is not None:
                        raise api_error_of(error.message())
                    index = int(result.get_response().id or 0)
                    image = result.as_numpy(OUTPUT_IMAGE)
                    steps = result.as_numpy(OUTPUT_STEPS)
                    step = int(steps.reshape(-1)[0]) if steps is not None else 0
                    if image is not None:
                        gen.done.add(index)
                        yield Event(index, step, image=image[0], final=True)
                        if len(gen.done) == req.n:
                            return
                    else:
                        yield Event(index, step, preview=result.as_numpy(OUTPUT_PREVIEW))
                raise ApiError(503, "server: the stream ended before every image was answered", None, "unavailable",
                               "server_error")
            finally:
                closed.set()

        def cancel() -> None:
            closed.set()
            it.cancel()

        gen = Generation(events(), cancel, req.n)
        return gen

    async def close(self) -> None:
        await self.client.close()


def create_app(triton: TritonImages, defaults: FrontDefaults = FrontDefaults(), max_in_flight: int = 64):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="Tessera images API (OpenAI-compatible)")
    state = {"in_flight": 0}

    def release() -> None:
        state["in_flight"] -= 1

    class _ClosingStream(StreamingResponse):
        """Closes its generation when the response ends in any way, even before the body started."""

        def __init__(self, body, gen: Generation):
            super().__init__(body, media_type="text/event-stream")
            self.gen = gen

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.gen.close()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        engines = await triton.engines(max_age_s=0.0)
        return JSONResponse({"engines": engines, "in_flight": state["in_flight"]}, status_code=200 if engines else 503)

    @app.get("/v1/models")
    async def models():
        names = await triton.engines(max_age_s=0.0)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tessera"}
                                           for n in names]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body: not valid JSON ({e})", None, "invalid_json") from e
        req = parse_generation(body, defaults)
        model = await triton.resolve(req.model)
        if state["in_flight"] >= max_in_flight:
            raise ApiError(429, f"server: at most {max_in_flight} generations in flight; retry later", None,
                           "overloaded", "rate_limit_error")
        state["in_flight"] += 1
        gen = triton.start(req, model)
        gen.on_close = release
        try:
            if req.stream:
                first = await _next_or_cancel(gen, request)  # admission errors still get their HTTP status
                return _ClosingStream(_sse(req, gen, first, request), gen)
            images = await _collect(req, gen, request)
        except Disconnected:
            return Response(status_code=499)  # nobody reads it
        except BaseException:
            gen.close()
            raise
        finally:
            if not req.stream:
                gen.close()
        return {"created": int(time.time()), "output_format": "png", "size": req.size,
                "data": [{"b64_json": png_b64(img), "steps": steps} for img, steps in images]}

    return app


async def _next_or_cancel(gen: Generation, request, poll_s: float = 0.1) -> Event | None:
    """The generation's next event (None after the last); if the client disconnects first, cancels the
    generation and raises Disconnected (polled: a non-streaming handler is not told otherwise)."""
    task = asyncio.ensure_future(anext(gen.events, None))
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            gen.close()
            task.cancel()
            raise Disconnected()


async def _collect(req: ImageRequest, gen: Generation, request) -> list[tuple[np.ndarray, int]]:
    images: dict[int, tuple[np.ndarray, int]] = {}
    while len(images) < req.n:
        event = await _next_or_cancel(gen, request)
        if event is None:
            raise ApiError(503, "server: the stream ended early", None, "unavailable", "server_error")
        if event.final:
            images[event.index] = (event.image, event.step)
    return [images[i] for i in range(req.n)]


def _sse_event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse(req: ImageRequest, gen: Generation, first: Event | None, request) -> AsyncIterator[bytes]:
    """Server-sent events: partial images at evenly spread steps, then one completed event per image. A
    client that goes away (seen by polling, or Starlette cancelling this generator) cancels the Triton
    requests."""
    marks = {i: partial_marks(req.steps, req.partial_images) for i in range(req.n)}
    sent = {i: 0 for i in range(req.n)}
    common = {"size": req.size, "output_format": "png", "quality": "auto", "background": "opaque"}
    event: Event | None = first
    try:
        while event is not None:
            now = int(time.time())
            if event.final:
                yield _sse_event("image_generation.completed", {
                    "type": "image_generation.completed", "b64_json": png_b64(event.image), "created_at": now,
                    "steps": event.step, "index": event.index, **common})
            elif event.preview is not None and marks[event.index] and event.step >= marks[event.index][0]:
                marks[event.index].pop(0)
                preview = upscale(event.preview[0], req.height, req.width)
                yield _sse_event("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": png_b64(preview), "created_at": now,
                    "partial_image_index": sent[event.index], "index": event.index, **common})
                sent[event.index] += 1
            event = await _next_or_cancel(gen, request)
    except Disconnected:
        return
    except ApiError as e:  # after the stream began: an error event (the openai client raises APIError)
        yield _sse_event("error", e.body())
    finally:
        gen.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera openai", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--triton", default="127.0.0.1:8001", help="the Tessera server's gRPC endpoint HOST:PORT")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept other hosts)")
    ap.add_argument("--port", type=int, default=9000, help="port to bind")
    ap.add_argument("--model", default=ENGINE_MODEL, help="the engine model a request without `model` uses")
    ap.add_argument("--default-size", default="256x256", help="WIDTHxHEIGHT for size 'auto' or no size")
    ap.add_argument("--default-steps", type=int, default=FrontDefaults().steps, help="num_inference_steps when absent")
    ap.add_argument("--default-guidance", type=float, default=FrontDefaults().guidance_scale,
                    help="guidance_scale when absent")
    ap.add_argument("--max-in-flight", type=int, default=64, help="generations in flight before 429")


def run(a: argparse.Namespace) -> int:
    import uvicorn

    m = _SIZE.match(a.default_size)
    if not m:
        print(f"--default-size: not WIDTHxHEIGHT; got {a.default_size!r}", file=sys.stderr)
        return 2
    defaults = FrontDefaults((int(m.group(1)), int(m.group(2))), a.default_steps, a.default_guidance)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def serve() -> None:
        triton = TritonImages(a.triton, a.model)
        app = create_app(triton, defaults, a.max_in_flight)
        server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="info"))
        try:
            await server.serve()
        finally:
            await triton.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

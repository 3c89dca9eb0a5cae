"""`make demo`: serve the committed heavy reference pipeline (quality_models/heavy, trained here on the
shapes world) on the embedded tritonserver, generate prompts such as "a red circle at top left" over HTTP,
gRPC and the OpenAI-compatible front (and three with ControlNet maps that put the object elsewhere than the
prompt says), classify every image with the evaluator, write a contact sheet PNG
with each prompt under its image, print a per-request table and the evaluator's agreement, and stop
everything (no process left behind). The tiny random-weight models stay for the tests."""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "quality_models"
PROTOCOLS = ("http", "grpc", "openai")
GUIDANCE = 4.0  # what the reference models were measured with (docs/quality.md)
# (prompt, (height, width)): every colour, shape and position, at the four trained resolutions
DEMO = (
    ("a red circle at top left", (64, 64)), ("a green square at bottom right", (128, 128)),
    ("a blue triangle at top right", (64, 128)), ("a yellow circle at bottom left", (128, 64)),
    ("a blue square at top left", (128, 128)), ("a red triangle at bottom right", (64, 64)),
    ("a yellow square at top right", (128, 64)), ("a green circle at bottom left", (64, 128)),
    ("a green triangle at top left", (64, 64)), ("a yellow triangle at bottom right", (64, 128)),
    ("a red square at bottom left", (128, 128)), ("a blue circle at top right", (128, 64)),
)
# ControlNets (issue 15): the prompt names one position, the control map puts the object at another: the
# evaluator must find it where the map says. (prompt, size, ControlNets, the map's label: colour, shape, position)
CONTROLLED = (
    ("a red circle at top left", (64, 64), ("silhouette",), (0, 0, 3)),
    ("a blue square at top right", (128, 128), ("box",), (2, 1, 2)),
    ("a yellow triangle at bottom left", (64, 128), ("silhouette", "box"), (3, 2, 1)),
)


@dataclass(slots=True)
class Row:
    protocol: str
    prompt: str
    size: tuple[int, int]  # (height, width)
    ms: float
    image: np.ndarray
    agrees: bool = False
    predicted: str = ""
    controlnets: tuple[str, ...] = ()
    expect: tuple[int, int, int] | None = None  # colour, shape, position the evaluator must see (None: the prompt's)

    @property
    def label(self) -> str:
        if not self.controlnets:
            return self.prompt
        from .quality.shapes import POSITIONS

        return f"{self.prompt} + {'+'.join(self.controlnets)} map at {POSITIONS[self.expect[2]]}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tessera.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="the contact sheet, the images and the server log go here")
    ap.add_argument("--repo", default="model_repository", help="the Triton model repository to write")
    ap.add_argument("--models", default=str(MODELS), help="the committed reference models (heavy/, evaluator.pt)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from tessera_export.repository import export_pipeline

    from .server import TritonServer, _group_members

    torch.set_num_threads(1)
    out, models = Path(args.out), Path(args.models)
    out.mkdir(parents=True, exist_ok=True)
    print(f"== 1/5 export the heavy reference pipeline ({models / 'heavy'}) to ONNX and a Triton repository",
          flush=True)
    nets = {k: models / "controlnet" / k for k in ("silhouette", "box") if (models / "controlnet" / k).is_dir()}
    controlled = [c for c in CONTROLLED if set(c[2]) <= set(nets)]
    export_pipeline(models / "heavy", args.repo, target="cpu", progress=lambda *_: None, controlnets=nets)
    print("== 2/5 start tritonserver and the OpenAI-compatible front (tessera openai)", flush=True)
    server = TritonServer(Path(args.repo), log_path=out / "tritonserver.log")
    rows: list[Row] = []
    pgids: list[int] = []
    front = None
    try:
        server.start()
        pgids.append(server.proc.pid)
        front, front_url = _start_front(server.grpc_url, out / "openai.log")
        pgids.append(front.pid)
        print(f"   ready: http {server.http_url}, grpc {server.grpc_url}, openai {front_url}/v1", flush=True)
        print(f"== 3/5 generate {len(DEMO) + len(controlled)} images ({len(controlled)} with ControlNets whose "
              f"map disagrees with the prompt), {args.steps} steps each", flush=True)
        jobs = [(prompt, size, (), None) for prompt, size in DEMO] + controlled
        for i, (prompt, size, names, expect) in enumerate(jobs):
            protocol = PROTOCOLS[i % len(PROTOCOLS)]
            control = _control(names, size, expect)
            t0 = time.perf_counter()
            image = _generate(protocol, server, front_url, prompt, size, args.steps, seed=i, control=control)
            rows.append(Row(protocol, prompt, size, (time.perf_counter() - t0) * 1e3, image, controlnets=names,
                            expect=expect))
    finally:
        if front is not None:
            _stop(front)
        server.stop()
    print("== 4/5 classify every image with the evaluator", flush=True)
    _classify(rows, models / "evaluator.pt")
    print("== 5/5 write the contact sheet", flush=True)
    sheet = out / "contact_sheet.png"
    _contact_sheet(rows).save(sheet)
    for i, r in enumerate(rows):
        from PIL import Image

        Image.fromarray(r.image).save(out / f"{i:02d}_{r.protocol}_{r.size[1]}x{r.size[0]}.png")
    print()
    print(f"{'protocol':8} {'size (WxH)':>10} {'ms':>6}  {'evaluator':9}  prompt")
    for r in rows:
        verdict = "agrees" if r.agrees else f"saw: {r.predicted}"
        print(f"{r.protocol:8} {r.size[1]:>4}x{r.size[0]:<5} {r.ms:>6.0f}  {verdict:9}  {r.label}")
    agree = sum(r.agrees for r in rows)
    left = [p for g in pgids for p in _group_members(g)]
    print(f"\nevaluator agreement (colour, shape and position all as asked): {agree}/{len(rows)}")
    print(f"contact sheet: {sheet}")
    print(f"server and front stopped; processes left: {len(left)}")
    return 0 if len(rows) == len(DEMO) + len(controlled) and not left else 1


def _start_front(grpc_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    from .server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.openai_front", "--triton", grpc_url, "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tessera openai exited with {proc.returncode}; see {log}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    _stop(proc)
    raise RuntimeError(f"tessera openai not ready within 60 s; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _control(names: tuple[str, ...], size, expect) -> dict:
    """The request's ControlNet inputs: each ControlNet's map of a scene with the expected label."""
    if not names:
        return {}
    from .quality.shapes import Label
    from .quality.train_controlnet import scene

    maps = [scene(Label(*expect), size[0], size[1], np.random.default_rng(7), k)[1] for k in names]
    return {"controlnet": ",".join(names),
            "control_image": np.concatenate([np.repeat(m[..., None], 3, axis=2) for m in maps], axis=2)}


def _generate(protocol: str, server, front_url: str, prompt: str, size, steps: int, seed: int,
              control: dict | None = None) -> np.ndarray:
    height, width = size
    control = control or {}
    if protocol == "openai":
        import openai
        from PIL import Image

        extra = {"seed": seed, "num_inference_steps": steps, "guidance_scale": GUIDANCE}
        if control:  # one base64 PNG per ControlNet
            image = control["control_image"]
            pngs = []
            for k in range(image.shape[2] // 3):
                buf = io.BytesIO()
                Image.fromarray(image[..., 3 * k : 3 * k + 3]).save(buf, "PNG")
                pngs.append(base64.b64encode(buf.getvalue()).decode())
            extra |= {"controlnet": control["controlnet"].split(","), "control_image": pngs}
        client = openai.OpenAI(base_url=front_url + "/v1", api_key="unused", max_retries=0)
        result = client.images.generate(prompt=prompt, size=f"{width}x{height}", response_format="b64_json",
                                        extra_body=extra)
        client.close()
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    from .client import infer_image, make_client, request_arrays

    client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
    try:
        return infer_image(client, protocol, request_arrays(prompt, height, width, steps, GUIDANCE, seed,
                                                            **control))[0]
    finally:
        client.close()


def _classify(rows: list[Row], evaluator_path: Path) -> None:
    from .quality.features import evaluator_features, load_evaluator
    from .quality.shapes import COLOURS, POSITIONS, SHAPES, parse_caption

    model = load_evaluator(evaluator_path)
    for r in rows:  # one at a time: the sizes differ (the evaluator resizes to its own input)
        _, pred = evaluator_features(model, np.array(r.image[None]))
        c, s, p = (int(v) for v in pred[0])
        want = parse_caption(r.prompt).as_array() if r.expect is None else np.array(r.expect)
        r.agrees = bool(np.array_equal(pred[0], want))
        r.predicted = f"{COLOURS[c]} {SHAPES[s]} {POSITIONS[p]}"


def _contact_sheet(rows: list[Row], cols: int = 4, scale: int = 2):
    """Each image at `scale`x (nearest) above its prompt, protocol, size, latency and the evaluator's verdict."""
    from PIL import Image, ImageDraw

    tile_w, img_h, text_h, pad = 128 * scale + 16, 128 * scale, 56, 8
    n_rows = -(-len(rows) // cols)
    sheet = Image.new("RGB", (cols * tile_w + pad, n_rows * (img_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        x0 = pad + (i % cols) * tile_w
        y0 = pad + (i // cols) * (img_h + text_h + pad)
        img = Image.fromarray(r.image).resize((r.image.shape[1] * scale, r.image.shape[0] * scale), Image.NEAREST)
        sheet.paste(img, (x0 + (tile_w - pad - img.width) // 2, y0 + (img_h - img.height) // 2))
        verdict = "evaluator agrees" if r.agrees else f"evaluator saw: {r.predicted}"
        draw.text((x0, y0 + img_h + 4), r.prompt, fill="black")
        if r.controlnets:  # the map's line: the evaluator is checked against it
            draw.text((x0, y0 + img_h + 16), r.label[len(r.prompt):].strip(), fill="navy")
        draw.text((x0, y0 + img_h + 28), f"{r.protocol}  {r.size[1]}x{r.size[0]}  {r.ms:.0f} ms", fill="dimgray")
        draw.text((x0, y0 + img_h + 40), verdict, fill="darkgreen" if r.agrees else "darkred")
    return sheet


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: build the tiny offline pipeline, export it, serve it on the embedded tritonserver,
generate images at three resolutions over HTTP and gRPC, print a per-request table, stop the server."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_SIZES = ((128, 128), (256, 256), (128, 256))  # (height, width)
DEMO_PROMPT = "a red circle at top left"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tessera.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="PNGs and the tiny pipeline go here")
    ap.add_argument("--repo", default="model_repository", help="the Triton model repository to write")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import torch
    from PIL import Image

    from tessera_export.repository import export_pipeline
    from tessera_export.tiny import build_tiny

    from .client import infer_image, make_client, request_arrays
    from .server import TritonServer, _group_members

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("== 1/4 build the tiny offline pipeline (random weights, fixed seeds)", flush=True)
    pipeline = build_tiny(out / "tiny-sd", kind="unet")
    print("== 2/4 export it to ONNX and write the Triton model repository", flush=True)
    export_pipeline(pipeline, args.repo, target="cpu")
    print("== 3/4 start tritonserver", flush=True)
    server = TritonServer(Path(args.repo), log_path=out / "tritonserver.log")
    rows = []
    pgid = None
    try:
        server.start()
        pgid = server.proc.pid
        print(f"   ready: http {server.http_url}, grpc {server.grpc_url}", flush=True)
        print("== 4/4 generate", flush=True)
        for protocol in ("http", "grpc"):
            client = make_client(protocol, server.http_url if protocol == "http" else server.grpc_url)
            for i, (h, w) in enumerate(DEMO_SIZES):
                arrays = request_arrays(DEMO_PROMPT, h, w, args.steps, guidance_scale=7.5, seed=i)
                t0 = time.perf_counter()
                image = infer_image(client, protocol, arrays)
                ms = (time.perf_counter() - t0) * 1e3
                path = out / f"{protocol}_{w}x{h}.png"
                Image.fromarray(image[0]).save(path)
                rows.append((protocol, f"{w}x{h}", args.steps, ms, path))
            client.close()
    finally:
        server.stop()
    print()
    print(f"{'protocol':8} {'size (WxH)':>10} {'steps':>5} {'latency ms':>11}  png")
    for protocol, size, steps, ms, path in rows:
        print(f"{protocol:8} {size:>10} {steps:>5} {ms:>11.0f}  {path}")
    left = _group_members(pgid) if pgid else []
    print(f"\nserver stopped; processes left: {len(left)}")
    return 0 if len(rows) == 2 * len(DEMO_SIZES) and not left else 1


if __name__ == "__main__":
    sys.exit(main())

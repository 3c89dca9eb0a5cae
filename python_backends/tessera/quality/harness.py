"""`tessera quality`: generate a prompt list x seeds through the SERVED pipeline (real tritonserver,
Tessera's engine and the settings under test) and through the in-process reference, then write every
metric next to its two floors (real-vs-real, seed-A-vs-seed-B) to perf/results/quality-<name>.json.

Settings are (label, pipeline, steps, engine overrides). The reference for paired metrics is the heavy
pipeline's full-step output from the same prompt and seed, served the same way.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .shapes import all_labels, batch

SEEDS_A = tuple(range(6))  # 48 prompts x 6 seeds = 288 images per setting
SEEDS_B = tuple(range(1000, 1006))  # the seed floor: same prompts, other seeds
FULL_STEPS = 50
GUIDANCE = 4.0
# The paired-fidelity check of fast paths against the full-step path (CI smoke tests), calibrated on the
# committed heavy model through the server (quality-baseline.json, N = 288): 10 steps 37.9 dB / SSIM 0.989
# pass, 2 steps 27.4 dB / 0.934 fail.
MIN_PSNR_DB = 33.0
MIN_SSIM = 0.95


def passes_paired(fid: dict) -> bool:
    return fid["psnr_db_mean"] >= MIN_PSNR_DB and fid["ssim_mean"] >= MIN_SSIM


@dataclass(frozen=True)
class Setting:
    label: str
    pipeline: str  # "heavy" or "light"
    steps: int
    engine: dict = field(default_factory=dict)  # engine config overrides (denoise_mode, ...)
    seeds: tuple[int, ...] = SEEDS_A


BASELINE = (
    Setting("heavy-50", "heavy", 50),
    Setting("heavy-50-seedB", "heavy", 50, seeds=SEEDS_B),
    Setting("heavy-20", "heavy", 20),
    Setting("heavy-10", "heavy", 10),
    Setting("heavy-4", "heavy", 4),
    Setting("heavy-2", "heavy", 2),
    Setting("light-50", "light", 50),
    Setting("light-10", "light", 10),
)


def _ee(eps: float, window: int, last_step: str = "x0") -> dict:
    return {"early_exit": "on", "exit_epsilon": eps, "exit_window": window, "last_step": last_step}


# Entropy early exit on the heavy model (issue: steps saved vs quality): a grid of epsilon x window with
# one last step (x0), and the default with the other endings (jump: +1 call; none: decode the noisy latent).
EARLY_EXIT = (
    Setting("heavy-50", "heavy", 50),
    Setting("heavy-50-seedB", "heavy", 50, seeds=SEEDS_B),
    *(Setting(f"ee-e{eps}-w{w}", "heavy", 50, _ee(eps, w)) for eps in (0.001, 0.002, 0.005) for w in (1, 2, 3)),
    Setting("ee-e0.002-w2-jump", "heavy", 50, _ee(0.002, 2, "jump")),
    Setting("ee-e0.002-w2-none", "heavy", 50, _ee(0.002, 2, "none")),
)
SETS = {"baseline": BASELINE, "early-exit": EARLY_EXIT}
RESULT_NAMES = {"baseline": "quality-baseline", "early-exit": "early_exit_quality"}


def jobs_for(seeds, size):
    labels = all_labels()
    return [(lb, seed, size) for seed in seeds for lb in labels]


def serve_reference(models_dir: Path, work: Path, settings, log_path: Path | None = None):
    """Export heavy/light into one repository with an engine per distinct engine setting."""
    from tessera_export.repository import add_engine, export_pipeline

    from ..config import EngineConfig

    repo = work / "repo"
    offline = EngineConfig(executor="local", policy="step-fcfs")  # an evaluation: every image, no deadlines
    for kind in sorted({s.pipeline for s in settings}):
        export_pipeline(models_dir / kind, repo, prefix=f"{kind}_", engine_config=offline, progress=lambda *_: None)
    engines = {}
    for s in settings:
        key = (s.pipeline, json.dumps(s.engine, sort_keys=True))
        if key in engines:
            continue
        if not s.engine:
            engines[key] = f"{s.pipeline}_txt2img"
        else:
            k = len(engines)
            add_engine(repo, f"{s.pipeline}_engine", f"{s.pipeline}_engine_{k}", entry=f"{s.pipeline}_txt2img_{k}",
                       **s.engine)
            engines[key] = f"{s.pipeline}_txt2img_{k}"
    return repo, engines


def generate_served(server, model: str, jobs, steps: int, concurrency: int = 8, progress=None,
                    early_exit: bool | None = None, with_steps: bool = False, extra=None, prompts=None):
    """Images [N, H, W, 3] for the jobs through the server (and, with_steps, the steps each ran [N]).
    `extra(i)`: more request_arrays keywords for job i (ControlNet inputs); `prompts`: one per job instead
    of the job label's caption."""
    from tessera.client import infer, make_client, request_arrays

    out: list[np.ndarray | None] = [None] * len(jobs)
    ran = np.zeros(len(jobs), np.int32)
    lock = threading.Lock()
    todo = list(range(len(jobs)))

    errors: list[BaseException] = []

    def worker():
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
            with lock:
                todo.clear()

    def work():
        client = make_client("grpc", server.grpc_url)
        while True:
            with lock:
                if not todo:
                    break
                i = todo.pop(0)
            lb, seed, (h, w) = jobs[i]
            arrays = request_arrays(lb.caption if prompts is None else prompts[i], h, w, steps, GUIDANCE, seed,
                                    early_exit=early_exit, **(extra(i) if extra is not None else {}))
            img, n = infer(client, "grpc", arrays, model=model)
            out[i], ran[i] = img[0], n[0]
            if progress:
                progress()
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{model}: {len(errors)} request(s) failed, first: {errors[0]}") from errors[0]
    return (np.stack(out), ran) if with_steps else np.stack(out)


def generate_in_process(pipeline_dir: Path, jobs, steps: int) -> np.ndarray:
    """The in-process diffusers reference (torch weights), same prompts and seeds."""
    import torch

    from tessera_export.tiny import load_pipeline

    pipe = load_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    imgs = []
    for lb, seed, (h, w) in jobs:
        im = pipe(lb.caption, height=h, width=w, num_inference_steps=steps, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]
        imgs.append(np.asarray(im))
    return np.stack(imgs)


class Bar:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0 = label, total, 0, time.monotonic()
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.done += 1
            if self.done % max(1, self.total // 10) and self.done < self.total:
                return
            w = 30
            k = int(w * self.done / self.total)
            print(f"\r[tessera] quality {self.label:16s} [{'#' * k}{'-' * (w - k)}] {self.done}/{self.total} "
                  f"{time.monotonic() - self.t0:5.0f}s", end="" if self.done < self.total else "\n", flush=True)


def run_quality(models_dir: str | Path, name: str = "baseline", settings=BASELINE, size=(64, 64),
                out_dir: str | Path = "perf/results", inception: bool = True, inprocess_check: int = 48,
                feature_threads: int = 1, result_name: str | None = None) -> dict:
    import torch

    from ..results import write_result

    from ..server import TritonServer
    from .features import efficientnet_features, evaluator_features, inception_features, load_evaluator
    from .metrics import adherence, frechet_distance, kid, paired

    torch.set_num_threads(1)
    models_dir = Path(models_dir)
    work = Path(tempfile.mkdtemp(prefix="tessera-quality-"))
    repo, entries = serve_reference(models_dir, work, settings)
    images: dict[str, np.ndarray] = {}
    steps_run: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        for s in settings:
            jobs = jobs_for(s.seeds, size)
            t0 = time.monotonic()
            model = entries[(s.pipeline, json.dumps(s.engine, sort_keys=True))]
            images[s.label], steps_run[s.label] = generate_served(server, model, jobs, s.steps, with_steps=True,
                                                                  progress=Bar(s.label, len(jobs)))
            timings[s.label] = time.monotonic() - t0
    ref_label = settings[0].label
    check_jobs = jobs_for(SEEDS_A, size)[:inprocess_check]
    in_proc = generate_in_process(models_dir / settings[0].pipeline, check_jobs, settings[0].steps)
    served_vs_inproc = paired(images[ref_label][: len(check_jobs)], in_proc)

    labels = np.stack([lb.as_array() for lb, _, _ in jobs_for(SEEDS_A, size)])
    rng = np.random.default_rng(12345)
    real_a, real_labels, _ = batch(len(labels), *size, rng, [lb for lb, _, _ in jobs_for(SEEDS_A, size)])
    real_b, _, _ = batch(len(labels), *size, rng, [lb for lb, _, _ in jobs_for(SEEDS_A, size)])
    real_a = (real_a * 255).round().astype(np.uint8)
    real_b = (real_b * 255).round().astype(np.uint8)

    torch.set_num_threads(feature_threads)  # the server is stopped by now: features may use more cores
    evaluator = load_evaluator(models_dir / "evaluator.pt")
    spaces = {"evaluator": lambda x: evaluator_features(evaluator, x)[0], "efficientnet": efficientnet_features}
    if inception:
        spaces["inception"] = inception_features
    feats = {sp: {k: fn(v) for k, v in {**images, "real_a": real_a, "real_b": real_b}.items()} for sp, fn in spaces.items()}
    preds = {k: evaluator_features(evaluator, v)[1] for k, v in {**images, "real_a": real_a}.items()}

    def distribution(label: str) -> dict:
        out = {}
        for sp in spaces:
            out[f"fd_{sp}"] = frechet_distance(feats[sp][label], feats[sp]["real_a"])
        if inception:
            out["kid_inception"] = kid(feats["inception"][label], feats["inception"]["real_a"])
        return out

    results = {}
    for s in settings:
        row = {"pipeline": s.pipeline, "steps": s.steps, "engine": s.engine, "n": len(images[s.label]),
               "seeds": list(s.seeds), "generation_s": timings[s.label],
               "steps_run_mean": float(steps_run[s.label].mean()),
               "steps_saved_fraction": 1.0 - float(steps_run[s.label].mean()) / s.steps}
        row["adherence"] = adherence(preds[s.label], labels)
        row["distribution_vs_real"] = distribution(s.label)
        if s.seeds == settings[0].seeds:
            row["paired_vs_reference"] = paired(
                images[s.label], images[ref_label], feats["efficientnet"][s.label], feats["efficientnet"][ref_label],
                preds[s.label], preds[ref_label],
            )
        results[s.label] = row
    seed_floor = paired(images["heavy-50-seedB"], images[ref_label], feats["efficientnet"]["heavy-50-seedB"],
                        feats["efficientnet"][ref_label], preds["heavy-50-seedB"], preds[ref_label]) \
        if "heavy-50-seedB" in images else None
    floors = {
        "real_vs_real": {f"fd_{sp}": frechet_distance(feats[sp]["real_b"], feats[sp]["real_a"]) for sp in spaces}
        | ({"kid_inception": kid(feats["inception"]["real_b"], feats["inception"]["real_a"])} if inception else {})
        | {"adherence_real": adherence(preds["real_a"], labels)},
        "seed_a_vs_seed_b": {"paired": seed_floor,
                             "distribution_vs_real": results.get("heavy-50-seedB", {}).get("distribution_vs_real")},
    }
    config = {"models_dir": str(models_dir), "size": list(size), "guidance": GUIDANCE, "prompts": 48,
              "seeds_a": list(SEEDS_A), "seeds_b": list(SEEDS_B), "reference": ref_label,
              "served_via": "tritonserver gRPC, txt2img -> engine (executor local)", "inception": inception}
    doc = {"settings": results, "floors": floors, "served_vs_in_process": served_vs_inproc}
    if seed_floor is not None:
        doc["within_seed_floor"] = within_seed_floor(results, ref_label, "heavy-50-seedB", seed_floor["psnr_db_mean"])
    path = write_result(result_name or f"quality-{name}", config, doc, Path(out_dir))
    print(f"[tessera] quality: wrote {path}")
    return doc


def within_seed_floor(results: dict, ref: str, seed_b: str, floor_psnr: float | None) -> dict:
    """Per setting: is its quality loss against the full-step reference inside the seed-to-seed floor?
    Paired PSNR: above the seed-A-vs-seed-B PSNR (the distance between two valid images of a prompt).
    Adherence: each attribute's accuracy differs from the reference's by no more than the seed-B run's
    accuracy does, or the difference is inside both Wilson 95% intervals (overlapping)."""
    out = {}
    for label, row in results.items():
        if label in (ref, seed_b) or "paired_vs_reference" not in row:
            continue
        adh = {}
        for attr in ("colour", "shape", "position"):
            a, r, b = row["adherence"][attr], results[ref]["adherence"][attr], results[seed_b]["adherence"][attr]
            gap, floor = abs(a["accuracy"] - r["accuracy"]), abs(b["accuracy"] - r["accuracy"])
            overlap = a["ci95"][0] <= r["ci95"][1] and r["ci95"][0] <= a["ci95"][1]
            adh[attr] = bool(gap <= floor or overlap)
        psnr_ok = floor_psnr is None or row["paired_vs_reference"]["psnr_db_mean"] > floor_psnr
        out[label] = {"steps_saved_fraction": row["steps_saved_fraction"], "psnr_above_seed_floor": psnr_ok,
                      "adherence_within_floor": adh, "all": bool(psnr_ok and all(adh.values()))}
    return out

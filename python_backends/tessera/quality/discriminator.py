"""The cascade's discriminator (DiffServe, issue 17): a small CNN that tells real rendered images (label 1) from
generated ones (label 0: the light AND the heavy pipeline's images, as DiffServe found works better than light
ones alone); its confidence is P(real). Exported to ONNX as its own Triton model (uint8 [N, H, W, 3] in, `p_real`
[N, 1] out). `train_discriminator` generates its data, trains it, and measures on held-out seeds what the cascade
plans with: the deferral profile f(t) and the light pipeline's adherence among the images it would keep and defer
at each threshold (the discriminator against random routing, offline). Everything it records comes from here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tokenizer import padded_ids
from ..wire import DISCRIMINATOR_IDS, DISCRIMINATOR_IMAGE, DISCRIMINATOR_OUTPUT
from .shapes import Label, all_labels, batch

SIZE = 64  # images are scored at 64 x 64 (larger ones resized, as the evaluator does)
QUANTILES = np.linspace(0.05, 0.95, 19)  # f(t) is measured at 0, 1 and these quantiles of the light confidences
INPUT, IDS, OUTPUT = DISCRIMINATOR_IMAGE, DISCRIMINATOR_IDS, DISCRIMINATOR_OUTPUT


def _convs(width: int) -> tuple[nn.Sequential, int]:
    """Both discriminators' image branch: 4 stride-2 convs (GroupNorm, SiLU), 64 x 64 -> 4 x 4; (layers, channels)."""
    chans = (3, width // 2, width, 2 * width, 2 * width)
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GroupNorm(8, chans[i + 1]), nn.SiLU()]
    return nn.Sequential(*layers), chans[-1]


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [-1, 1] [N, 3, 64, 64], always resized (identity at 64 x 64), so the exported graph
    resizes every size it is given."""
    x = images.float().permute(0, 3, 1, 2) / 127.5 - 1.0
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


class Discriminator(nn.Module):
    """uint8 [N, H, W, 3] -> P(real) [N, 1]: 4 stride-2 convs (GroupNorm, SiLU), mean pool, one logit."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv, chans = _convs(width)
        self.head = nn.Linear(chans, 1)

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_pixels(_pixels(images))

    def logit_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The logit of float images in [-1, 1], [N, 3, 64, 64] (differentiable: the student's critic)."""
        return self.head(self.conv(x).mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(images))


class PromptDiscriminator(nn.Module):
    """(uint8 image [N, H, W, 3], int64 input_ids [N, L]) -> P(real AND of this prompt) [N, 1]: a projection
    discriminator (Miyato & Koyama, 2018). The image branch is Discriminator's convs with the 4 x 4 map kept whole
    (where the object is matters); the prompt is the mean of its token embeddings (padding excluded); logit =
    head(image) + <text, image>. Trained with real images of other prompts as a third kind of "fake", it learns
    what makes an image wrong for its prompt, which the unconditional one cannot see."""

    def __init__(self, vocab: int, pad_id: int, width: int = 32, dim: int = 128):
        super().__init__()
        self.conv, chans = _convs(width)
        self.image = nn.Linear(chans * (SIZE // 16) ** 2, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.text = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, 1)
        self.register_buffer("pad_id", torch.tensor(pad_id, dtype=torch.int64), persistent=True)

    def logit(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.image(self.conv(_pixels(images)).flatten(1)))
        mask = (input_ids != self.pad_id).float().unsqueeze(-1)
        t = self.text((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        return self.head(h) + (t * h).sum(-1, keepdim=True)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(images, input_ids))


def generate(pipeline, jobs: list[tuple[Label, int]], steps: int, guidance: float = 4.0, size: int = SIZE,
             chunk: int = 48) -> np.ndarray:
    """uint8 [N, size, size, 3]: the diffusers pipeline (a directory, or one already loaded) on (label, seed) jobs,
    batched."""
    from tessera_export.tiny import load_pipeline

    pipe = load_pipeline(pipeline) if isinstance(pipeline, (str, Path)) else pipeline
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(jobs), chunk):
        part = jobs[i : i + chunk]
        ims = pipe([lb.caption for lb, _ in part], height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, generator=[torch.Generator().manual_seed(s) for _, s in part],
                   output_type="np").images
        out.append((np.clip(ims, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def jobs_for(n: int, seed0: int) -> list[tuple[Label, int]]:
    labels = all_labels()
    return [(labels[i % len(labels)], seed0 + i) for i in range(n)]


def real_images(n: int, seed: int, captions: bool = False):
    """uint8 [n, SIZE, SIZE, 3] rendered images of random labels (and, with `captions`, their captions)."""
    images, _, caps = batch(n, SIZE, SIZE, np.random.default_rng(seed))
    images = (images * 255).round().astype(np.uint8)
    return (images, caps) if captions else images


@torch.no_grad()
def score(model: nn.Module, images: np.ndarray, input_ids: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """The model's confidence per image (a PromptDiscriminator also takes each image's prompt ids)."""
    def one(i):
        x = torch.from_numpy(images[i : i + chunk])
        return (model(x) if input_ids is None else model(x, torch.from_numpy(input_ids[i : i + chunk]))).numpy()[:, 0]

    return np.concatenate([one(i) for i in range(0, len(images), chunk)])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def export_onnx(model: nn.Module, path: str | Path) -> float:
    """ONNX with dynamic batch, height and width (and prompt length for a PromptDiscriminator); returns the largest
    |ONNX - torch| on random batches at two sizes."""
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    prompted = isinstance(model, PromptDiscriminator)
    vocab = model.embed.num_embeddings if prompted else 0

    def example(n, h, w):
        image = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)
        return (image, torch.randint(0, vocab, (n, 77), dtype=torch.int64)) if prompted else (image,)

    names = [INPUT, IDS] if prompted else [INPUT]
    axes = {INPUT: {0: "batch", 1: "height", 2: "width"}, OUTPUT: {0: "batch"}}
    if prompted:
        axes[IDS] = {0: "batch", 1: "tokens"}
    torch.onnx.export(model, example(2, SIZE, SIZE), str(path), input_names=names, output_names=[OUTPUT],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    err = 0.0
    for h, w in ((SIZE, SIZE), (2 * SIZE, SIZE)):  # the exported graph resizes, as torch does
        test = example(3, h, w)
        with torch.no_grad():
            want = model(*test).numpy()
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, test, strict=True)})[0]
        err = max(err, float(np.abs(got - want).max()))
    return err


def build(record: dict) -> nn.Module:
    """The untrained network a training record describes (its `inputs`; a prompt one's vocabulary and padding)."""
    from ..options import DiscriminatorInput

    inputs = DiscriminatorInput.parse("inputs", record.get("inputs", DiscriminatorInput.IMAGE.value))
    if inputs is DiscriminatorInput.IMAGE:
        return Discriminator()
    return PromptDiscriminator(record["tokenizer"]["vocab"], record["tokenizer"]["pad_id"])


def export_checkpoint(src_dir: str | Path, path: str | Path) -> float:
    """model.onnx at `path` from the trained weights `src_dir`/discriminator.pt and its record (the repository keeps
    the weights; ONNX files are build outputs); returns the largest |ONNX - torch|, as export_onnx."""
    src_dir = Path(src_dir)
    model = build(json.loads((src_dir / "discriminator.json").read_text()))
    model.load_state_dict(torch.load(src_dir / "discriminator.pt", map_location="cpu", weights_only=True))
    return export_onnx(model, path)


def near_miss(label: Label, rng: np.random.Generator) -> Label:
    """The label with one attribute (colour, shape or position, at random) changed to another value."""
    from .shapes import COLOURS, POSITIONS, SHAPES

    values = [label.colour, label.shape, label.position]
    k = int(rng.integers(3))
    n = (len(COLOURS), len(SHAPES), len(POSITIONS))[k]
    values[k] = (values[k] + int(rng.integers(1, n))) % n
    return Label(*values)


def _fit(model: nn.Module, sample, steps: int) -> tuple[list[float], float]:
    """`steps` AdamW steps on the batches `sample()` draws ((images, ids or None, labels)); (losses, seconds)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    t0, losses = time.monotonic(), []
    for _ in range(steps):
        x, ids, y = sample()
        args = (torch.from_numpy(x),) if ids is None else (torch.from_numpy(x), torch.from_numpy(ids))
        loss = F.binary_cross_entropy_with_logits(model.logit(*args)[:, 0], torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses, time.monotonic() - t0


def _prompt_sampler(real, real_caps, generated, generated_caps, tokenizer, share: float, rng, n: int = 64):
    """Batches for a PromptDiscriminator: half real images with their own prompt (label 1); the other half fakes,
    `share` of the batch generated images with their prompt, the rest real images with a near-miss prompt (one
    attribute changed)."""
    from .shapes import parse_caption

    ids = {c: padded_ids(tokenizer, [c])[0] for c in {lb.caption for lb in all_labels()}}
    n_real, n_gen = n // 2, int(round(n * share))
    n_miss = n - n_real - n_gen

    def sample():
        i, j = rng.integers(0, len(real), n_real), rng.integers(0, len(real), n_miss)
        k = rng.integers(0, len(generated), n_gen)
        caps = ([real_caps[a] for a in i] + [near_miss(parse_caption(real_caps[a]), rng).caption for a in j]
                + [generated_caps[a] for a in k])
        x = np.concatenate([real[i], real[j], generated[k]])
        y = np.concatenate([np.ones(n_real), np.zeros(n_miss + n_gen)]).astype(np.float32)
        return x, np.stack([ids[c] for c in caps]), y

    return sample


def _routing(c_light: np.ndarray, right_light: np.ndarray, right_heavy: np.ndarray, grid) -> list[dict]:
    """Per threshold: the deferral, the light images kept and deferred that are right, the cascade's share right
    and random routing's at the same deferral (the mix of the two pipelines' rates)."""
    rows = []
    for t in grid:
        keep = c_light >= t
        d = float(1 - keep.mean())
        rows.append({"threshold": float(t), "deferral": d,
                     "light_right_kept": float(right_light[keep].mean()) if keep.any() else None,
                     "light_right_deferred": float(right_light[~keep].mean()) if (~keep).any() else None,
                     "cascade_right": float(np.where(keep, right_light, right_heavy).mean()),
                     "random_right": float((1 - d) * right_light.mean() + d * right_heavy.mean())})
    return rows


def train_discriminator(out_dir: str | Path, light_dir: str | Path, heavy_dir: str | Path, evaluator_path: str | Path,
                        light_steps: int, heavy_steps: int = 50, per_kind: int = 576, held_out: int = 288,
                        steps: int = 600, seed: int = 0, inputs: str = "image", generated_share: float = 0.0,
                        ablate: tuple[float, ...] = ()) -> dict:
    """Generate, train, export `out_dir`/model.onnx and write `out_dir`/discriminator.json (the training record,
    the profile f(t) and the per-threshold adherence); returns that record.

    inputs "image": DiffServe's discriminator, real rendered images (label 1) against the light and heavy
    pipelines' (label 0). inputs "image+prompt": a PromptDiscriminator, real images with their prompt (1) against
    real images with a near-miss prompt and, for `generated_share` of each batch, generated images with theirs (0);
    `ablate` trains one more per listed share and records how each routes on the held-out set."""
    from ..errors import ConfigError
    from ..options import DiscriminatorInput
    from .features import evaluator_features, load_evaluator
    from .shapes import parse_caption

    kind = DiscriminatorInput.parse("inputs", inputs)
    if (ablate or generated_share) and kind is DiscriminatorInput.IMAGE:
        raise ConfigError("generated_share, ablate: settings of inputs image+prompt only (inputs image trains on "
                          f"real vs generated images, half each); got {generated_share}, {ablate}")
    if not 0.0 <= generated_share <= 0.5 or any(not 0.0 <= a <= 0.5 for a in ablate):
        raise ConfigError(f"generated_share, ablate: shares of a batch in [0, 0.5], got {generated_share}, {ablate}")
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    train_jobs, heavy_jobs = jobs_for(per_kind, 100_000 + seed * 10_000), jobs_for(per_kind, 200_000 + seed * 10_000)
    light = generate(light_dir, train_jobs, light_steps)
    heavy = generate(heavy_dir, heavy_jobs, heavy_steps)
    real, real_caps = real_images(2 * per_kind, seed + 17, captions=True)
    gen_s = time.monotonic() - t0
    generated = np.concatenate([light, heavy])
    generated_caps = [lb.caption for lb, _ in train_jobs + heavy_jobs]
    tokenizer = None
    if kind is DiscriminatorInput.IMAGE:
        x = np.concatenate([real, generated])
        y = np.concatenate([np.ones(len(real)), np.zeros(len(generated))]).astype(np.float32)

        def sample():
            idx = rng.integers(0, len(x), size=64)
            return x[idx], None, y[idx]

        config = {"inputs": kind.value}
    else:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(Path(light_dir) / "tokenizer")
        sample = _prompt_sampler(real, real_caps, generated, generated_caps, tokenizer, generated_share, rng)
        config = {"inputs": kind.value, "tokenizer": {"dir": str(Path(light_dir) / "tokenizer"), "vocab": len(tokenizer),
                                                      "pad_id": int(tokenizer.pad_token_id)}}
    model = build(config)
    losses, train_s = _fit(model, sample, steps)
    # held out: other seeds (and prompts cycled from the start), scored and judged by the evaluator
    ho_jobs = jobs_for(held_out, 300_000 + seed * 10_000)
    ho_light = generate(light_dir, ho_jobs, light_steps)
    ho_heavy = generate(heavy_dir, ho_jobs, heavy_steps)
    ho_real, ho_real_caps = real_images(held_out, seed + 29, captions=True)
    ids = (lambda caps: None) if tokenizer is None else (lambda caps: padded_ids(tokenizer, caps))
    ho_caps = [lb.caption for lb, _ in ho_jobs]
    miss_caps = [near_miss(parse_caption(c), np.random.default_rng(seed + i)).caption for i, c in enumerate(ho_real_caps)]

    def light_and_real(m):
        return score(m, ho_light, ids(ho_caps)), score(m, ho_real, ids(ho_real_caps))

    c_light, c_real = light_and_real(model)
    c_heavy = score(model, ho_heavy, ids(ho_caps))
    c_miss = score(model, ho_real, ids(miss_caps)) if tokenizer is not None else None
    ev = load_evaluator(evaluator_path)
    labels = np.stack([parse_caption(c).as_array() for c in ho_caps])
    right_light = (evaluator_features(ev, ho_light)[1] == labels).all(axis=1)
    right_heavy = (evaluator_features(ev, ho_heavy)[1] == labels).all(axis=1)
    mixed = right_light.any() and (~right_light).any()
    from ..cascade import DeferralProfile

    # the grid: quantiles of the held-out light confidences (a discriminator sure that every generated image is
    # fake puts them all near 0: a fixed grid in P(real) would not resolve them), with 0 (keep all) and 1
    grid = sorted({0.0, 1.0, *(float(q) for q in np.quantile(c_light, QUANTILES))})
    profile = DeferralProfile.measure(c_light, grid)
    per_t = _routing(c_light, right_light, right_heavy, grid)
    ablation = []
    for share in ablate:  # the same recipe at other shares of generated images: how each routes, held out
        torch.manual_seed(seed)
        other = build(config)
        _fit(other, _prompt_sampler(real, real_caps, generated, generated_caps, tokenizer, share,
                                    np.random.default_rng(seed)), steps)
        cl, cr = light_and_real(other)
        at = [float(np.quantile(cl, q)) for q in (0.3, 0.5, 0.7)]  # 30%, 50%, 70% deferred
        ablation.append({"generated_share": share, "auc_right_vs_wrong_light": auc(cl[right_light], cl[~right_light])
                         if mixed else None, "auc_real_vs_light": auc(cr, cl),
                         "at_deferral": _routing(cl, right_light, right_heavy, at)})
    path = out / "model.onnx"
    max_err = export_onnx(model, path)
    torch.save(model.state_dict(), out / "discriminator.pt")
    held = {"n": held_out, "auc_real_vs_light": auc(c_real, c_light), "auc_real_vs_heavy": auc(c_real, c_heavy),
            "auc_right_vs_wrong_light": auc(c_light[right_light], c_light[~right_light]) if mixed else None,
            "light_right": float(right_light.mean()), "heavy_right": float(right_heavy.mean()),
            "confidence_mean": {"real": float(c_real.mean()), "light": float(c_light.mean()),
                                "heavy": float(c_heavy.mean())}}
    if c_miss is not None:
        held["auc_real_vs_near_miss_prompt"] = auc(c_real, c_miss)
        held["confidence_mean"]["real_near_miss_prompt"] = float(c_miss.mean())
    train = {"real": len(real), "light": len(light), "heavy": len(heavy), "steps": steps, "batch": 64, "seed": seed,
             "generate_s": round(gen_s, 1), "train_s": round(train_s, 1),
             "final_loss_mean_last_50": float(np.mean(losses[-50:]))}
    if tokenizer is not None:
        train["generated_share"] = generated_share
    record = {
        "trained_by": "tessera.quality.discriminator.train_discriminator", **config,
        "light": {"dir": str(light_dir), "steps": light_steps}, "heavy": {"dir": str(heavy_dir), "steps": heavy_steps},
        "train": train, "held_out": held, "profile": profile.to_json(), "per_threshold": per_t,
        "onnx_max_abs_err": max_err,
    }
    if ablation:
        record["ablation"] = ablation
    (out / "discriminator.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

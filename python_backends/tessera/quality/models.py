"""Reference model definitions: heavy and light text-to-image pipelines in the diffusers format Tessera
serves (CLIP text encoder + BPE tokenizer, UNet2DConditionModel with cross-attention, AutoencoderKL,
DDIM), and the evaluator CNN (colour, shape and position heads plus a feature layer)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tokenizer import build_clip_tokenizer
from .shapes import COLOURS, POSITIONS, SHAPES

VOCAB = 4096
TEXT_HIDDEN = 64
EVAL_SIZE = 64  # the evaluator sees every image resized to 64x64

# Three levels: at 64x64 px the bottleneck is 2x2 latent cells, one per quadrant, which is where the
# "at top left" words can act through cross-attention (a 2-level UNet left position at chance).
UNETS = {
    "heavy": dict(block_out_channels=(48, 96, 96), layers_per_block=1, attention_head_dim=8),
    "light": dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8),
}

# How each committed generator was trained: phases of (train until step, conv_in kernel, loss weighting),
# each resumed from the previous one (quality_models/training.json). The heavy model's 9x9 input convolution
# (zero padded, the trained 3x3 kernel widened at its centre) gives every cell of a 64 px image's 8x8 latent
# its absolute position: with 3x3 convolutions only, position words stayed unlearned (docs/quality.md).
RECIPES = {
    "heavy": ((4080, 3, "min-snr"), (5000, 3, "v"), (8579, 9, "v")),
    "light": ((1009, 3, "min-snr"),),
}


def tokenizer():
    return build_clip_tokenizer(VOCAB)


def text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(cfg)


def vae():
    from diffusers import AutoencoderKL

    # Four blocks: the real 8x factor. A 64x64 image has an 8x8x4 latent.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=16, sample_size=64,
    )


def unet(kind: str, conv_in_kernel: int = 3):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_HIDDEN, norm_num_groups=16, conv_in_kernel=conv_in_kernel, **UNETS[kind],
    )


def sampler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
    )


class Evaluator(nn.Module):
    """5 conv layers (GroupNorm, SiLU) -> 128-d feature -> colour/shape/position logits."""

    def __init__(self):
        super().__init__()
        chans = (3, 32, 64, 64, 128, 128)
        layers = []
        for i in range(5):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i else 1, padding=1),
                       nn.GroupNorm(8, chans[i + 1]), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        self.feature = nn.Linear(128 * 4 * 4, 128)
        self.heads = nn.ModuleList(nn.Linear(128, n) for n in (len(COLOURS), len(SHAPES), len(POSITIONS)))

    @staticmethod
    def prepare(images01: torch.Tensor) -> torch.Tensor:
        """[N, H, W, 3] or [N, 3, H, W] in [0, 1] -> [N, 3, 64, 64] in [-1, 1]."""
        x = images01.permute(0, 3, 1, 2) if images01.shape[-1] == 3 else images01
        x = F.interpolate(x.float(), size=(EVAL_SIZE, EVAL_SIZE), mode="area")
        return x * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # [N, 128, 4, 4]: stride-2 layers keep coarse position
        return F.silu(self.feature(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [head(f) for head in self.heads]

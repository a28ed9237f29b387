"""Training objectives for Wan-style flow-matching video models.

Wan is trained on `x_sigma = sigma * noise + (1 - sigma) * x0` to predict `v = noise - x0`; the
losses here are on v (ComfyUI's TrainLoraNode regresses x0, which down-weights low noise levels).
Masks live on the latent grid `[B, 1, T, H, W]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..adapters.parts import Projector
from ..errors import InputError
from ..representations.motion import RaftEncoder, raft_flow, resize_flow

SIGMA_SAMPLING = ("logit_normal", "uniform")
# Wan 2.2 A14B's switch from the high-noise to the low-noise expert, as a noise level (its published
# `boundary`, timestep / 1000): text-to-video 0.875, image-to-video 0.9.
EXPERT_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}


@dataclass(frozen=True)
class SigmaSampler:
    """Noise levels for training: uniform or logit-normal in t, then the model's shift
    (`sigma = shift * t / (1 + (shift - 1) * t)`, as Wan's sampler schedules them).

    `low`, `high`: the range of noise levels drawn (Wan 2.2's experts each learn one side of a boundary). The
    distribution keeps its shape inside the range (musubi-tuner's `preserve_distribution_shape`): it is the
    full draw's, restricted to `[low, high]`, sampled by its inverse CDF so that every draw lands in range."""

    mode: str = "logit_normal"
    shift: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    low: float = field(default=0.0, metadata={"recorded": "if changed"})
    high: float = field(default=1.0, metadata={"recorded": "if changed"})

    def __post_init__(self):
        if self.mode not in SIGMA_SAMPLING:
            raise InputError("timestep_sampling", f"'{self.mode}'", f"one of {SIGMA_SAMPLING}")
        if self.shift <= 0:
            raise InputError("shift", f"{self.shift}", "a positive shift (Wan uses 3 to 8; 1 = none)")
        if not 0.0 <= self.low < self.high <= 1.0:
            raise InputError("noise_range", f"noise levels from {self.low} to {self.high}",
                             "a range inside 0 to 1 with low < high (e.g. 0.875 to 1 for Wan 2.2's high-noise expert)")

    def within(self, low: float, high: float) -> SigmaSampler:
        """The same draw restricted to noise levels in `[low, high]`."""
        return replace(self, low=low, high=high)

    def __call__(self, batch: int, g: torch.Generator) -> torch.Tensor:
        if (self.low, self.high) != (0.0, 1.0):
            return self._in_range(batch, g)
        if self.mode == "uniform":
            t = torch.rand(batch, generator=g)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(batch, generator=g))
        return self._shifted(t)

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def _in_range(self, batch: int, g: torch.Generator) -> torch.Tensor:
        # The shift is monotone, so sigma in [low, high] is t in [unshifted(low), unshifted(high)]; the draw's
        # quantiles there bound a uniform draw that the inverse CDF maps back.
        bounds = torch.tensor([self.low, self.high], dtype=torch.float64)
        t_bounds = bounds / (self.shift - (self.shift - 1) * bounds)
        u = torch.rand(batch, generator=g, dtype=torch.float64)
        if self.mode == "uniform":
            t = t_bounds[0] + (t_bounds[1] - t_bounds[0]) * u
        else:
            normal = torch.distributions.Normal(0.0, 1.0)
            q = normal.cdf((torch.logit(t_bounds) - self.mean) / self.std)
            t = torch.sigmoid(self.mean + self.std * torch.special.ndtri(q[0] + (q[1] - q[0]) * u))
        return self._shifted(t).clamp(self.low, self.high).float()


# Which noise levels a run learns: all of them, or one side of a two-expert model's boundary.
NOISE_RANGES = ("all", "high_noise", "low_noise")


def expert_range(which: str, boundary: float) -> tuple[float, float]:
    """The noise levels `[low, high]` of `which` of NOISE_RANGES, the experts meeting at `boundary`."""
    if which not in NOISE_RANGES:
        raise InputError("noise_range", f"'{which}'", f"one of {NOISE_RANGES}")
    if not 0.0 < boundary < 1.0:
        raise InputError("expert_boundary", f"{boundary}", "a noise level between 0 and 1 (Wan 2.2: 0.875 text-to-video, "
                         "0.9 image-to-video)")
    return {"all": (0.0, 1.0), "high_noise": (boundary, 1.0), "low_noise": (0.0, boundary)}[which]


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, target v) for clean latents `[B, C, T, H, W]` at per-sample sigma `[B]`."""
    noise = torch.randn(x0.shape, generator=g).to(x0)
    s = sigma.to(x0).view(-1, *([1] * (x0.ndim - 1)))
    return s * noise + (1 - s) * x0, noise - x0


def region_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                batch_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE, or MotionBooth's subject region loss `sum((pred - target)^2 * M) / sum(M)` with M on the latent grid.
    `batch_mask`: the step's whole batch's M where `pred` holds this process's share of its rows
    (`distributed.own_rows`): the share's sum is divided by its part of the whole batch's sum(M), so the mean over the
    shares is the whole batch's loss however the mask's area is spread over the rows."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err).expand_as(err)
    if batch_mask is None:
        return (err * m).sum() / m.sum().clamp_min(1.0)
    whole = batch_mask.to(err).expand(len(batch_mask), *err.shape[1:]).sum().clamp_min(1.0)
    return (err * m).sum() / (whole * len(mask) / len(batch_mask))


def appearance_debiased(x: torch.Tensor, frame: int) -> torch.Tensor:
    """MotionDirector's appearance-debiased latent `sqrt(2) * x - x[:, :, frame]`: what differs between frames."""
    return math.sqrt(2) * x - x[:, :, frame:frame + 1]


def latent_mask(masks: torch.Tensor, latent_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Pixel masks `[B, F, H, W]` -> `[B, 1, T, h, w]` on the latent grid; a latent cell is 1 if any of its
    pixels (over its frames too) is in the mask (MotionBooth: any nonzero = 1)."""
    t, h, w = latent_shape[-3:]
    m = masks.float()[:, None]  # [B, 1, F, H, W]
    if m.shape[2] % t and m.shape[2] != 1:
        # Wan's VAE keeps the first frame alone (1 + 4k frames): pad to a multiple by repeating it.
        pad = t - m.shape[2] % t
        m = torch.cat([m[:, :, :1].expand(-1, -1, pad, -1, -1), m], 2)
    return (F.adaptive_max_pool3d(m, (t, h, w)) > 0).float()


def widened(masks: torch.Tensor, cells: int) -> torch.Tensor:
    """Latent-grid masks `[B, 1, T, h, w]` grown by `cells` in height and width."""
    if cells <= 0:
        return masks
    return F.max_pool3d(masks, (1, 2 * cells + 1, 2 * cells + 1), stride=1, padding=(0, cells, cells))


def tokens_to_grid(h: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Hidden states `[B, t*h*w, D]` (tokens in t, y, x order) -> `[B, D, t, h, w]`."""
    t, gh, gw = grid
    if h.shape[1] != t * gh * gw:
        raise ValueError(f"{h.shape[1]} tokens do not fill a {grid} grid")
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], t, gh, gw)


def subject_alignment_loss(projector: Projector, hidden: torch.Tensor, grid: tuple[int, int, int],
                           dino_tokens: torch.Tensor) -> torch.Tensor:
    """SMRABooth's SuRA: `-mean cos(proj(h), dino)` over patch tokens, for 1-frame (image) latents.

    hidden `[B, L, D]` from a DiT block with token grid (1, h, w); dino_tokens `[B, D_dino, Gh, Gw]`,
    resampled to the DiT grid (bilinear) so each DiT token meets the DINOv2 feature of its place.
    """
    projected = tokens_to_grid(projector(hidden), grid)[:, :, 0]  # [B, D_dino, h, w]
    target = F.interpolate(dino_tokens.to(projected), size=projected.shape[-2:], mode="bilinear",
                           align_corners=False)
    return -F.cosine_similarity(projected, target, dim=1).mean()


def flow_on_token_grid(flow: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-pair pixel flow `[B, F-1, 2, H, W]` -> the motion each token's frame group carries,
    `[B, 2, t, h, w]`, as fractions of the frame (x by width, y by height).

    The F-1 pairs are split into t consecutive groups (Wan's VAE gives each latent frame a group of
    frames), summed over the group (displacement across it) and area-averaged onto the token grid.
    """
    b, pairs, _, hh, ww = flow.shape
    t, gh, gw = grid
    scale = torch.tensor([1.0 / ww, 1.0 / hh], dtype=flow.dtype, device=flow.device).view(1, 1, 2, 1, 1)
    flow = flow * scale
    edges = torch.linspace(0, pairs, t + 1).round().long().tolist()
    groups = [flow[:, a:max(b_, a + 1)].sum(1) if pairs else flow.new_zeros(b, 2, hh, ww)
              for a, b_ in zip(edges[:-1], edges[1:])]
    out = torch.stack(groups, 2)  # [B, 2, t, H, W]
    return F.adaptive_avg_pool3d(out, (t, gh, gw))


def motion_alignment_loss(projector: Projector, hidden: torch.Tensor, grid: tuple[int, int, int],
                          flow_tokens: torch.Tensor) -> torch.Tensor:
    """The cheap MoRA: a projector reads each token's motion (the RAFT flow of its place and frame
    group, from `flow_on_token_grid`) off a block's hidden states; L1 as in the authors' flow loss.
    The gradient through the hidden states teaches the motion LoRA to carry the reference motion."""
    projected = tokens_to_grid(projector(hidden), grid)
    return (projected - flow_tokens.to(projected)).abs().mean()


@dataclass
class DecodedFlow:
    """MoRA as SMRABooth's code runs it: the predicted clean latent of a window of latent frames is decoded
    to pixels with gradients, RAFT's flow of the decoded frames is compared (L1, as fractions of the frame)
    with the reference clip's flow. Costly (a VAE decode and RAFT in every step's graph); the feature-level
    `motion_alignment_loss` is the default.

    decode: latents `[B, C, t, h, w]` in the model's space -> frames `[B, F, H, W, 3]` in [0, 1], differentiable.
    pixel_frames: a latent window `[t0, t1)` -> the range of the clip's frames its decode shows.
    """

    decode: Callable[[torch.Tensor], torch.Tensor]
    raft: RaftEncoder
    pixel_frames: Callable[[int, int], tuple[int, int]]
    window: int = 6  # latent frames decoded per step (the authors' 6)
    iterations: int = 6  # RAFT flow updates per pair

    def __post_init__(self):
        self.raft.model.requires_grad_(False)  # a fixed measure: gradients flow through it, not into it

    @staticmethod
    def causal_frames(factor: int) -> Callable[[int, int], tuple[int, int]]:
        """Wan's VAE: a window decoded on its own gives its first latent frame as one image frame and each
        later one as `factor` frames, so it shows the last `factor * (t1 - t0) - (factor - 1)` frames of
        its latent frames."""
        return lambda t0, t1: (factor * t0, factor * t1 - (factor - 1))

    @staticmethod
    def grouped_frames(factor: int) -> Callable[[int, int], tuple[int, int]]:
        """A latent frame holds exactly `factor` frames (the shapes world's map)."""
        return lambda t0, t1: (factor * t0, factor * t1)


def decoded_flow_loss(decoded: DecodedFlow, x0_pred: torch.Tensor, reference_flow: torch.Tensor,
                      g: torch.Generator) -> torch.Tensor:
    """L1 between RAFT's flow of the decoded prediction and the reference flow `[B, F-1, 2, H, W]` (pixels),
    on a random window of `decoded.window` latent frames, both scaled by the frame's width and height."""
    t = x0_pred.shape[2]
    w = min(decoded.window, t)
    t0 = int(torch.randint(t - w + 1, (1,), generator=g))
    frames = decoded.decode(x0_pred[:, :, t0:t0 + w])
    f0, f1 = decoded.pixel_frames(t0, t0 + w)
    b, f, h, wd, _ = frames.shape
    if f != f1 - f0 or f1 - 1 > reference_flow.shape[1] or f < 2:
        raise InputError("motion clips", f"latent frames {t0}..{t0 + w} decode to {f} frames, and the reference "
                         f"flow covers {reference_flow.shape[1] + 1} frames",
                         "reference flow of the same clips the latents were encoded from")
    pred = raft_flow(decoded.raft, frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1), decoded.iterations)
    ref = resize_flow(reference_flow[:, f0:f1 - 1].flatten(0, 1).to(pred), (h, wd))
    scale = torch.tensor([1.0 / wd, 1.0 / h], device=pred.device).view(1, 2, 1, 1)
    return ((pred - ref) * scale).abs().mean()


def subject_token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: list[int]) -> torch.Tensor:
    """Post-softmax cross-attention probability on the subject's text tokens, averaged over heads and those
    tokens: `[B, Lq]`. The softmax runs over every text token; only the subject's columns are kept."""
    b, lq, dim = q.shape
    qh = q.view(b, lq, heads, dim // heads).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, dim // heads).transpose(1, 2)
    probs = torch.softmax((qh @ kh.transpose(-1, -2)).float() / math.sqrt(dim // heads), dim=-1)  # [B,H,Lq,Lk]
    return probs[..., tokens].mean(-1).mean(1)


def token_attention_loss(maps: list[torch.Tensor], mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """MotionBooth's subject-token cross-attention loss: BCE between the subject tokens' attention (averaged
    over the chosen blocks) and the subject mask on the token grid (a token is subject if any latent cell is)."""
    attention = torch.stack(maps).mean(0).clamp(1e-6, 1 - 1e-6)  # [B, Lq]
    target = (F.adaptive_max_pool3d(mask.float(), grid) > 0).float().flatten(1)  # [B, t*h*w]
    return F.binary_cross_entropy(attention, target.to(attention))

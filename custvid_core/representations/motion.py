"""Motion representation: RAFT optical flow of a reference clip (SMRABooth's motion encoder).

SMRABooth aligns the motion LoRA with optical flow of the reference videos (MoRA). This module
loads torchvision's RAFT (large or small) from a local file and turns a clip into per-pair flow
fields, an object-level motion descriptor and a flow preview.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..files import load_state_dict
from ..images import as_image_list, as_mask_list, stack_same_size

RAFT_VARIANTS = ("raft_large", "raft_small")
# torchvision's RAFT works on a 1/8 grid with a 4-level correlation pyramid and refuses
# feature maps under 16 cells, so smaller clips are upscaled for it and the flow mapped back.
MIN_WORK_SIDE = 128


@dataclass
class RaftEncoder:
    model: torch.nn.Module
    variant: str
    name: str


@dataclass
class MotionRepresentation:
    """Optical flow of one clip and what it says about the moving subject.

    flow: [F-1, 2, H, W] flow from frame t to t+1 in pixels (x, y), at the clip's size.
    object_flow: [F-1, 2] mean flow of the subject, as a fraction of the frame width/height.
    trajectory: [F, 2] the subject's centroid (x, y) per frame, as fractions of width/height.
    The subject is the mask when masks are given; otherwise the moving pixels of each pair
    (flow above a quarter of that pair's largest motion and above half a pixel; the whole
    frame if nothing moves).
    """

    flow: torch.Tensor
    object_flow: torch.Tensor
    trajectory: torch.Tensor
    encoder: str
    iterations: int
    subject_from: str  # "masks" or "flow"

    kind = "motion"

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.flow.shape[-2:])


def build_raft(variant: str = "raft_small") -> RaftEncoder:
    """torchvision's RAFT with random weights (for training one, and for tests)."""
    from torchvision.models import optical_flow

    if variant not in RAFT_VARIANTS:
        raise InputError("variant", f"'{variant}' is not a RAFT variant", f"one of {RAFT_VARIANTS}")
    return RaftEncoder(getattr(optical_flow, variant)(weights=None, progress=False).eval(), variant, variant)


def load_raft(path: str | Path, input_name: str = "raft_path") -> RaftEncoder:
    """Load torchvision RAFT weights (large or small, detected from the file) from .pth or .safetensors."""
    from torchvision.models import optical_flow

    path = Path(path)
    sd = load_state_dict(path, input_name)
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    for variant in RAFT_VARIANTS:
        with torch.device("meta"):
            ref = getattr(optical_flow, variant)(weights=None, progress=False).state_dict()
        if set(ref) == set(sd) and all(ref[k].shape == sd[k].shape for k in ref):
            model = getattr(optical_flow, variant)(weights=None, progress=False)
            model.load_state_dict(sd)
            return RaftEncoder(model.eval(), variant, path.stem)
    raise InputError(input_name, f"'{path.name}' matches neither RAFT architecture",
                     "torchvision RAFT weights (raft_large_*.pth or raft_small_*.pth, or the same as .safetensors)")


def _work_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    """The size flow is computed at: at most `max_side`, at least MIN_WORK_SIDE, multiples of 8."""
    scale = min(1.0, max_side / max(h, w))
    scale = max(scale, MIN_WORK_SIDE / min(h, w))
    return (max(8, int(round(h * scale / 8)) * 8), max(8, int(round(w * scale / 8)) * 8))


def raft_flow(raft: RaftEncoder, first: torch.Tensor, second: torch.Tensor, iterations: int = 12,
              max_side: int = 512) -> torch.Tensor:
    """Flow from `first` to `second` (`[N, H, W, 3]` in [0, 1]) -> `[N, 2, H, W]` in pixels of the input size.

    Frames are resized to the work size (see `_work_size`) and the flow is resized back with its vectors
    rescaled. Differentiable with respect to the frames (MoRA's decoded-flow alignment needs that).
    """
    n, h, w, _ = first.shape
    wh, ww = _work_size(h, w, max_side)
    param = next(raft.model.parameters())

    def prepare(frames):
        x = frames.permute(0, 3, 1, 2).float()
        if (wh, ww) != (h, w):
            x = F.interpolate(x, size=(wh, ww), mode="bilinear", align_corners=False, antialias=wh < h)
        return (x * 2 - 1).to(param.device, param.dtype)  # RAFT expects [-1, 1]

    return resize_flow(raft.model(prepare(first), prepare(second), num_flow_updates=iterations)[-1].float(), (h, w))


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Flow `[N, 2, h, w]` in pixels -> `[N, 2, *size]`, resampled bilinearly with its vectors rescaled."""
    h, w = flow.shape[-2:]
    if (h, w) == tuple(size):
        return flow
    out = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
    return out * torch.tensor([size[1] / w, size[0] / h], device=flow.device, dtype=out.dtype).view(1, 2, 1, 1)


@torch.no_grad()
def compute_flow(raft: RaftEncoder, frames: torch.Tensor, iterations: int = 12, max_side: int = 512,
                 batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Flow between consecutive frames `[F, H, W, 3]` -> `[F-1, 2, H, W]` in pixels of the input size,
    `batch_size` pairs at a time through RAFT."""
    pairs = frames.shape[0] - 1
    bar = None
    if progress is None:
        from tqdm.auto import tqdm
        bar = tqdm(total=pairs, desc="RAFT motion flow", unit="pair")
    flows = []
    for start in range(0, pairs, batch_size):
        stop = min(start + batch_size, pairs)
        flows.append(raft_flow(raft, frames[start:stop], frames[start + 1:stop + 1], iterations, max_side).cpu())
        if bar is not None:
            bar.update(stop - bar.n)
        else:
            progress(stop, pairs)
    if bar is not None:
        bar.close()
    return torch.cat(flows)


def moving_region(flow: torch.Tensor) -> torch.Tensor:
    """Per pair, the pixels that move: above a quarter of the pair's peak motion and half a pixel."""
    mag = flow.norm(dim=1)
    peak = mag.flatten(1).amax(1).view(-1, 1, 1)
    region = ((mag > 0.25 * peak) & (mag > 0.5)).float()
    still = region.sum((1, 2)) == 0
    region[still] = 1.0  # nothing moves: the whole frame stands for the subject
    return region


def _centroids(weights: torch.Tensor) -> torch.Tensor:
    """[N, H, W] weights -> [N, 2] weighted centroids (x, y) as fractions of width/height."""
    n, h, w = weights.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    total = weights.sum((1, 2)).clamp_min(1e-6)
    return torch.stack([(weights.sum(1) * xs).sum(1) / total, (weights.sum(2) * ys).sum(1) / total], 1)


def extract_motion(raft: RaftEncoder, frames: torch.Tensor | Sequence[torch.Tensor],
                   masks: torch.Tensor | Sequence[torch.Tensor] | None = None, iterations: int = 12,
                   max_side: int = 512, batch_size: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> MotionRepresentation:
    """The motion representation of a clip (frames `[F, H, W, 3]` in [0, 1], F >= 2)."""
    frame_list = as_image_list(frames, "frames", min_count=2)
    mask_list = as_mask_list(masks, frame_list, "masks")
    clip = stack_same_size(frame_list, "frames")
    if not 1 <= iterations <= 64:
        raise InputError("iterations", f"{iterations} flow updates", "between 1 and 64 (RAFT's default is 12)")
    if not MIN_WORK_SIDE <= max_side <= 4096:
        raise InputError("max_side", f"{max_side} pixels", f"between {MIN_WORK_SIDE} and 4096")
    if batch_size < 1:
        raise InputError("batch_size", f"{batch_size} is below 1", "a batch size of 1 or more")

    flow = compute_flow(raft, clip, iterations, max_side, batch_size, progress)
    h, w = clip.shape[1:3]
    scale = torch.tensor([w, h], dtype=torch.float32)
    if mask_list is not None:
        weights = torch.stack(mask_list)
        if (weights.flatten(1).amax(1) <= 0).any():
            empty = int((weights.flatten(1).amax(1) <= 0).nonzero()[0])
            raise InputError("masks", f"mask {empty} is empty", "masks that mark the subject in every frame")
        pair_weights = weights[:-1]
    else:
        pair_weights = moving_region(flow)
    object_flow = (flow * pair_weights[:, None]).sum((2, 3)) / pair_weights.sum((1, 2)).clamp_min(1e-6)[:, None]
    object_flow = object_flow / scale
    if mask_list is not None:
        trajectory = _centroids(weights)
    else:
        starts = _centroids(pair_weights)
        trajectory = torch.cat([starts, starts[-1:] + object_flow[-1:]])
    return MotionRepresentation(flow=flow, object_flow=object_flow, trajectory=trajectory,
                                encoder=raft.name, iterations=iterations,
                                subject_from="masks" if mask_list is not None else "flow")


def flow_preview(rep: MotionRepresentation) -> torch.Tensor:
    """Colour-coded flow `[F-1, H, W, 3]` in [0, 1]; one scale for the whole clip so frames compare."""
    from torchvision.utils import flow_to_image

    flow = rep.flow.float()
    peak = flow.norm(dim=1).max().clamp_min(1e-6)
    # flow_to_image normalises by the batch's largest vector; scaling first keeps that at `peak`.
    images = flow_to_image(flow / peak)
    return images.permute(0, 2, 3, 1).float() / 255.0

"""The world's own subject and motion encoders, so SuRA and MoRA align with targets that mean something.

- RAFT (torchvision's raft_small) trained on world clips against their exact optical flow: the
  generator knows where every pixel goes (objects translate along their path, the background moves
  against the camera), the way RAFT itself was trained on synthetic scenes.
- DINOv2 (transformers' Dinov2Model, tiny, patch 4 on 32-pixel images) trained *supervised*, not by
  self-distillation (which does not fit the CPU budget): its CLS token predicts the object's colour,
  shape and texture, and every patch token predicts what covers it (background, or the object's
  colour, shape and texture), so patch tokens carry the object's identity where it is.

Both are written in the formats the loaders read (`load_raft`, `load_dinov2`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import save_safetensors
from ..representations.motion import MIN_WORK_SIDE, RaftEncoder, build_raft, compute_flow
from ..representations.subject import DinoEncoder, build_dinov2, extract_subject
from .scene import COLOURS, PATHS, SHAPES, TEXTURES, Clip, Scene, WorldSpec, random_scene, render

WEIGHTS_DIR = Path(__file__).parent / "weights"
RAFT_FILE = WEIGHTS_DIR / "raft" / "custvid_shapes_world_raft_small.safetensors"
DINO_FILE = WEIGHTS_DIR / "dino" / "custvid_shapes_world_dinov2.safetensors"
DINO_CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, patch_size=4, image_size=32,
                   mlp_ratio=4)


# --- scenes covering everything the encoders may meet ---------------------------------------------
def any_scene(g: torch.Generator, spec: WorldSpec, camera_speed: float = 1.5) -> Scene:
    """A scene from the whole world (all colours, shapes, textures, paths) with a random camera pan."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    scene = random_scene(g, spec, colours=tuple(COLOURS), shapes=SHAPES, textures=TEXTURES,
                         camera_speed=camera_speed * float(torch.rand((), generator=g)))
    path = pick(PATHS[:4])  # straight, circle, zigzag, bounce
    if path != "straight":
        scene.path = path
        scene.start = tuple(float(v) for v in (spec.size * (0.3 + 0.4 * torch.rand(2, generator=g))))
        if path == "circle":
            scene.path_params = {"center": (spec.size / 2, spec.size / 2)}
        elif path == "bounce":
            scene.path_params = {"velocity": tuple(float(v) for v in (torch.rand(2, generator=g) * 6 - 3))}
    return scene


def exact_flow(clip: Clip) -> torch.Tensor:
    """[F-1, 2, H, W] true forward flow in pixels: the object's pixels move with its path, the
    rest with the background (against the camera)."""
    moves = clip.centres[1:] - clip.centres[:-1]
    camera = torch.tensor(clip.scene.camera, dtype=torch.float32)
    n, h, w = clip.masks.shape
    flow = (-camera).view(1, 2, 1, 1).expand(n - 1, 2, h, w).clone()
    obj = clip.masks[:-1, None] > 0.5
    return torch.where(obj, moves.view(-1, 2, 1, 1).expand_as(flow), flow)


# --- RAFT -------------------------------------------------------------------------------------------
@dataclass
class RaftTrainConfig:
    steps: int = 800
    batch: int = 6  # frame pairs
    lr: float = 4e-4
    iterations: int = 6  # flow updates while training (12 when measuring)
    gamma: float = 0.8  # RAFT's sequence-loss decay
    seed: int = 0


def _raft_batch(g, spec, n):
    """n frame pairs at RAFT's work size (the clip upscaled as compute_flow does) and their true flow."""
    scale = MIN_WORK_SIDE / spec.size
    a, b, flows = [], [], []
    for _ in range(n):
        clip = render(any_scene(g, spec), spec)
        t = int(torch.randint(spec.frames - 1, (1,), generator=g))
        a.append(clip.frames[t])
        b.append(clip.frames[t + 1])
        flows.append(exact_flow(clip)[t])

    def upscale(frames):  # as compute_flow does, into RAFT's [-1, 1]
        x = F.interpolate(torch.stack(frames).permute(0, 3, 1, 2), scale_factor=scale, mode="bilinear",
                          align_corners=False)
        return x * 2 - 1

    flow = F.interpolate(torch.stack(flows), scale_factor=scale, mode="nearest") * scale
    return upscale(a), upscale(b), flow


def train_world_raft(cfg: RaftTrainConfig, spec: WorldSpec = WorldSpec(), log=print) -> RaftEncoder:
    torch.manual_seed(cfg.seed)
    raft = build_raft("raft_small")
    model = raft.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        a, b, flow = _raft_batch(g, spec, cfg.batch)
        preds = model(a, b, num_flow_updates=cfg.iterations)
        weights = [cfg.gamma ** (len(preds) - 1 - i) for i in range(len(preds))]
        loss = sum(w * (p - flow).abs().mean() for w, p in zip(weights, preds))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            epe = (preds[-1] - flow).norm(dim=1).mean() / (MIN_WORK_SIDE / spec.size)
            log(f"raft step {step + 1}/{cfg.steps} loss {loss.item():.3f} epe {epe:.3f}px "
                f"{(time.perf_counter() - t0) / (step + 1):.2f}s/step")
    model.eval()
    raft.name = "custvid_shapes_world_raft_small"
    return raft


def raft_quality(raft: RaftEncoder, spec: WorldSpec = WorldSpec(), clips: int = 32, seed: int = 12345) -> dict:
    """End-point error (pixels of the 32-px frame) on held-out world clips, against zero flow."""
    g = torch.Generator().manual_seed(seed)
    errors, zero, obj_errors, obj_zero = [], [], [], []
    for _ in range(clips):
        clip = render(any_scene(g, spec), spec)
        truth = exact_flow(clip)
        pred = compute_flow(raft, clip.frames, iterations=12, progress=lambda *_: None)
        err = (pred - truth).norm(dim=1)
        errors.append(err.mean())
        zero.append(truth.norm(dim=1).mean())
        obj = clip.masks[:-1] > 0.5
        obj_errors.append(err[obj].mean())
        obj_zero.append(truth.norm(dim=1)[obj].mean())
    mean = lambda xs: float(torch.stack(xs).mean())  # noqa: E731
    return {"epe_px": mean(errors), "epe_object_px": mean(obj_errors), "zero_flow_epe_px": mean(zero),
            "zero_flow_epe_object_px": mean(obj_zero), "clips": clips}


def save_world_raft(raft: RaftEncoder, path: str | Path = RAFT_FILE, info: dict | None = None) -> Path:
    return save_safetensors(path, raft.model.state_dict(), {"custvid.encoder.info": info or {}})


# --- DINOv2 -----------------------------------------------------------------------------------------
@dataclass
class DinoTrainConfig:
    steps: int = 800
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0


class _DinoHeads(nn.Module):
    """Supervision heads: CLS -> colour/shape/texture; each patch -> background or the object's labels."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.ModuleDict({"colour": nn.Linear(dim, len(COLOURS)), "shape": nn.Linear(dim, len(SHAPES)),
                                  "texture": nn.Linear(dim, len(TEXTURES))})
        self.patch = nn.ModuleDict({"colour": nn.Linear(dim, len(COLOURS) + 1), "shape": nn.Linear(dim, len(SHAPES) + 1),
                                    "texture": nn.Linear(dim, len(TEXTURES) + 1)})


def _labels(scene: Scene) -> dict:
    return {"colour": list(COLOURS).index(scene.colour), "shape": SHAPES.index(scene.shape),
            "texture": TEXTURES.index(scene.texture)}


def _dino_batch(g, spec, n):
    images, masks, labels = [], [], []
    single = WorldSpec(size=spec.size, frames=1, object_size=spec.object_size, speed=spec.speed)
    for _ in range(n):
        scene = any_scene(g, single)
        clip = render(scene, single)
        images.append(clip.frames[0])
        masks.append(clip.masks[0])
        labels.append(_labels(scene))
    return torch.stack(images), torch.stack(masks), {k: torch.tensor([lab[k] for lab in labels]) for k in labels[0]}


def _dino_forward(encoder: DinoEncoder, images: torch.Tensor):
    from ..representations.subject import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    hidden = encoder.model(pixel_values=(images.permute(0, 3, 1, 2) - mean) / std).last_hidden_state
    grid = images.shape[1] // encoder.patch_size
    return hidden[:, 0], hidden[:, 1:].reshape(len(images), grid, grid, -1)


def train_world_dino(cfg: DinoTrainConfig, spec: WorldSpec = WorldSpec(), log=print) -> DinoEncoder:
    torch.manual_seed(cfg.seed)
    encoder = build_dinov2(DINO_CONFIG, name="custvid_shapes_world_dinov2")
    heads = _DinoHeads(DINO_CONFIG["hidden_size"])
    params = list(encoder.model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed)
    encoder.model.train()
    p = encoder.patch_size
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        images, masks, labels = _dino_batch(g, spec, cfg.batch)
        cls, patches = _dino_forward(encoder, images)
        covered = F.avg_pool2d(masks[:, None], p)[:, 0] > 0.5  # the patch is mostly object
        loss = 0.0
        for k, head in heads.cls.items():
            loss = loss + F.cross_entropy(head(cls), labels[k])
        for k, head in heads.patch.items():
            target = torch.where(covered, labels[k].view(-1, 1, 1) + 1, 0)  # 0 = background
            loss = loss + F.cross_entropy(head(patches).permute(0, 3, 1, 2), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log(f"dino step {step + 1}/{cfg.steps} loss {loss.item():.3f} "
                f"{(time.perf_counter() - t0) / (step + 1):.2f}s/step")
    encoder.model.eval()
    return encoder


def dino_quality(encoder: DinoEncoder, spec: WorldSpec = WorldSpec(), per_class: int = 200, seed: int = 54321) -> dict:
    """How well mask-pooled object features separate subjects: nearest-centroid accuracy of colour,
    shape and texture on held-out images (centroids from one half, accuracy on the other)."""
    g = torch.Generator().manual_seed(seed)
    images, masks, labels = _dino_batch(g, spec, per_class * 2)
    rep = extract_subject(encoder, images, masks, resolution=spec.size, fit="stretch", batch_size=64,
                          progress=lambda *_: None)
    feats = F.normalize(rep.object_features, dim=1)
    half = per_class
    out = {}
    for k, y in labels.items():
        classes = y[:half].unique()
        centroids = torch.stack([feats[:half][y[:half] == c].mean(0) for c in classes])
        pred = classes[(feats[half:] @ F.normalize(centroids, dim=1).T).argmax(1)]
        out[f"{k}_accuracy"] = float((pred == y[half:]).float().mean())
    # Same subject (colour, shape, texture) vs different: mean cosine of their object features.
    key = labels["colour"] * 100 + labels["shape"] * 10 + labels["texture"]
    sim = feats @ feats.T
    same = (key[:, None] == key[None]) & ~torch.eye(len(key), dtype=torch.bool)
    out["same_subject_cosine"] = float(sim[same].mean()) if same.any() else float("nan")
    out["different_subject_cosine"] = float(sim[key[:, None] != key[None]].mean())
    out["images"] = len(key)
    return out


def save_world_dino(encoder: DinoEncoder, path: str | Path = DINO_FILE, info: dict | None = None) -> Path:
    return save_safetensors(path, encoder.model.state_dict(),
                            {"config": json.dumps(DINO_CONFIG), "custvid.encoder.info": info or {}})

"""Pretraining the shapes-world base model with Wan's flow-matching objective.

`python -m custvid_core world-train --out DIR` trains from scratch (or resumes from DIR), keeps an
EMA copy, and writes the EMA weights in ComfyUI's native Wan layout plus the text encoder.
Clips come from a pool that is partly re-rendered every step, so rendering stays a small part
of a step on a CPU while the model keeps seeing new clips.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic_path
from ..training.loop import warmup_cosine
from ..training.objectives import SigmaSampler, add_noise
from .latent import encode
from .model import World, build_world, load_world, save_world
from .scene import WorldSpec, random_scene, render


@dataclass
class TrainConfig:
    steps: int = 4000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    cfg_dropout: float = 0.1
    # Noise levels: "logit_normal" (SD3) with sigma_mean / sigma_std, or "shifted": uniform t mapped by
    # the sampler's own schedule (shift `sigma_shift`), so training covers the high noise levels where
    # sampling spends its first steps and where a clip's layout and motion are decided.
    sigma_sampling: str = "logit_normal"
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    sigma_shift: float = 3.0
    # Clips whose camera pans (a random direction, not named in the prompt), as real videos often do:
    # a model that has seen pans can be steered into one (camera by latent shift).
    pan_fraction: float = 0.0
    pan_speed_min: float = 0.5  # pixels per frame
    pan_speed_max: float = 2.5
    # Pixels the path's midpoint may move from the frame's centre; negative: a start anywhere in frame.
    centred_jitter: float = -1.0
    init_from: str = ""  # a world model file to start from instead of random weights
    pool: int = 2048
    refresh: int = 4  # clips re-rendered per step
    seed: int = 0
    checkpoint_every: int = 250
    layers: int = 6
    heads: int = 1  # of 128 dims each (ComfyUI's Wan detection reads heads as dim / 128)
    ffn: int = 512
    init: str = "diffusers"


class ClipPool:
    """Rendered clips (latents and prompts); `refresh` of them are replaced by new ones each step."""

    def __init__(self, size: int, spec: WorldSpec, generator: torch.Generator, cfg: TrainConfig):
        self.spec, self.g, self.cfg = spec, generator, cfg
        self.items: list[tuple[torch.Tensor, str]] = []
        for _ in range(size):
            self._add()

    def _add(self, index: int | None = None):
        pan = 0.0
        if self.cfg.pan_fraction and float(torch.rand((), generator=self.g)) < self.cfg.pan_fraction:
            lo, hi = self.cfg.pan_speed_min, self.cfg.pan_speed_max
            pan = lo + (hi - lo) * float(torch.rand((), generator=self.g))
        jitter = self.cfg.centred_jitter if self.cfg.centred_jitter >= 0 else None
        clip = render(random_scene(self.g, self.spec, camera_speed=pan, centred_jitter=jitter), self.spec)
        item = (encode(clip.frames)[0], clip.prompt)
        if index is None:
            self.items.append(item)
        else:
            self.items[index] = item

    def refresh(self, count: int):
        for _ in range(count):
            self._add(int(torch.randint(len(self.items), (1,), generator=self.g)))

    def batch(self, size: int) -> tuple[torch.Tensor, list[str]]:
        chosen = [self.items[i] for i in torch.randint(len(self.items), (size,), generator=self.g).tolist()]
        return torch.stack([c[0] for c in chosen]), [c[1] for c in chosen]


def lr_at(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def sigma_sampler(cfg: TrainConfig) -> SigmaSampler:
    if cfg.sigma_sampling == "shifted":
        return SigmaSampler("uniform", cfg.sigma_shift)
    return SigmaSampler("logit_normal", 1.0, cfg.sigma_mean, cfg.sigma_std)


def flow_matching_loss(world: World, x0: torch.Tensor, prompts: list[str], g: torch.Generator,
                       sigmas: SigmaSampler, cfg_dropout: float) -> torch.Tensor:
    b = x0.shape[0]
    sigma = sigmas(b, g)
    x, target = add_noise(x0, sigma, g)
    drop = torch.rand(b, generator=g) < cfg_dropout
    context = world.text(["" if d else p for d, p in zip(drop.tolist(), prompts)])
    return F.mse_loss(world.backbone.forward(x, sigma, context), target)


def _trainable(world: World) -> list[torch.nn.Parameter]:
    return list(world.backbone.model.parameters()) + list(world.text.parameters())


def train_world(out: str | Path, cfg: TrainConfig, spec: WorldSpec = WorldSpec(), command: str = "",
                log=print) -> World:
    """Train (or resume) in `out`; returns the EMA world, also written to out/ as the shipped files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    config = dict(num_layers=cfg.layers, ffn_dim=cfg.ffn, num_attention_heads=cfg.heads)
    from .model import DEFAULT_CONFIG, text_file_for

    world = build_world({**DEFAULT_CONFIG, **config}, spec, seed=cfg.seed, init=cfg.init)
    started_from = {}
    if cfg.init_from:
        start_from = load_world(cfg.init_from, text_file_for(cfg.init_from))
        world.backbone.model.load_state_dict(start_from.backbone.model.state_dict())
        world.text.load_state_dict(start_from.text.state_dict())
        started_from = start_from.info
    ema = copy.deepcopy(world)
    params = _trainable(world)
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(cfg.seed)
    sigmas = sigma_sampler(cfg)
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        world.backbone.model.load_state_dict(state["model"])
        world.text.load_state_dict(state["text"])
        ema.backbone.model.load_state_dict(state["ema_model"])
        ema.text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        start = int(state["step"])
        log(f"resumed from step {start}")
    # The pool has its own stream so batches and noise continue unchanged on resume.
    pool = ClipPool(cfg.pool, spec, torch.Generator().manual_seed(cfg.seed * 1_000_003 + start), cfg)
    world.backbone.model.train()
    ema_params = _trainable(ema)
    log_file = open(out / "log.jsonl", "a")
    t_last, losses = time.perf_counter(), []
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x0, prompts = pool.batch(cfg.batch)
        loss = flow_matching_loss(world, x0, prompts, g, sigmas, cfg.cfg_dropout)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at step {step}; the last checkpoint is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_params, params):
                pe.lerp_(p, 1 - d)
        pool.refresh(cfg.refresh)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            now = time.perf_counter()
            rec = {"step": step + 1, "loss": sum(losses) / len(losses), "lr": lr_at(step, cfg),
                   "seconds_per_step": (now - t_last) / len(losses)}
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            log(f"step {rec['step']}/{cfg.steps} loss {rec['loss']:.4f} {rec['seconds_per_step']:.2f}s/step")
            t_last, losses = now, []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": world.backbone.model.state_dict(), "text": world.text.state_dict(),
                            "ema_model": ema.backbone.model.state_dict(), "ema_text": ema.text.state_dict(),
                            "optimizer": opt.state_dict(), "generator": g.get_state(), "step": step + 1,
                            "config": asdict(cfg)}, tmp)
    log_file.close()
    ema.backbone.model.eval()
    ema.info = {"command": command, "seed": cfg.seed, "steps": cfg.steps, "train_config": asdict(cfg)}
    if started_from:
        ema.info["started_from"] = started_from  # how the starting weights were made, recursively
    save_world(ema, out / "custvid_shapes_world_wan21.safetensors", out / "custvid_shapes_world_text.safetensors")
    return ema

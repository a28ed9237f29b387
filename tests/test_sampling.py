"""The sampling contract: one step record (progress, conditional rows) and the controls written against it, driven
by the world's sampler exactly as the controls were driven before the contract existed."""

from pathlib import Path

import torch

from custvid_core.adapters.lora import LoraAdapters, LoraSpec
from custvid_core.backbones.wan import describe
from custvid_core.control.boxes import BoxSteering, BoxTrack, TokenRoles
from custvid_core.control.camera import CameraPath, StepWindow
from custvid_core.control.strength import StrengthSchedule
from custvid_core.world.model import DEFAULT_CONFIG, World
from custvid_core.world.scene import WorldSpec

RECORDED = Path(__file__).parent / "data" / "controlled_generate.safetensors"
PROMPTS = ["red circle", "blue square"]


class _Text:
    """A fixed context per prompt: the recorded clips depend on the sampler and the controls, not on the world's
    text encoder."""

    length = 8

    def __call__(self, prompts):
        g = torch.Generator().manual_seed(7)
        table = {p: torch.randn(self.length, DEFAULT_CONFIG["text_dim"], generator=g) for p in ["", *PROMPTS]}
        return torch.stack([table[p] for p in prompts])


def _world_with_lora():
    """A 2-block world whose weights and LoRA come from one generator (not from any initialiser), and the LoRA."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**{**DEFAULT_CONFIG, "num_layers": 2, "ffn_dim": 64})
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    world = World(describe(model), _Text(), WorldSpec())
    adapters = LoraAdapters(world.backbone, [LoraSpec("subject", ("self_attn.q", "ffn.0"), rank=2)])
    tensors = adapters.native_state_dict("subject")
    adapters.load_native_state_dict("subject", {k: torch.randn(v.shape, generator=g) * 0.2 if v.ndim else v
                                                for k, v in tensors.items()})
    return world, adapters


SCHEDULES = {"subject": StrengthSchedule(((0.0, 0.0), (0.5, 1.5)))}
BOXES = BoxTrack.parse("0: 0, 0, 0.5, 0.5\n1: 0.5, 0.5, 1, 1")
STEERING = [BoxSteering(BOXES, TokenRoles((1,), (0, 1, 2)), alpha=5.0, tau=0.4),
            BoxSteering(BOXES, TokenRoles((2,), (0, 1, 2, 3), background=(3,)), alpha=5.0, tau=0.4)]
SAMPLING = dict(seed=3, steps=5, cfg=3.0, camera=CameraPath.constant(0.25, 0.1), camera_window=StepWindow(0.2, 0.6),
                camera_boxes=BOXES.per_frame(5)[:, None], steering=STEERING)


def _generate(with_strengths=True, **changes):
    from custvid_core.control.strength import ScheduledStrengths
    from custvid_core.world.sample import generate

    world, adapters = _world_with_lora()
    with adapters:
        controls = [ScheduledStrengths(adapters, SCHEDULES)] if with_strengths else []
        return generate(world, PROMPTS, controls=controls, progress=lambda *_: None, **{**SAMPLING, **changes})


def test_generate_with_camera_steering_and_a_strength_schedule_gives_the_recorded_clips():
    """Recorded at commit 8f9787e, before the sampling contract: the same world and settings through
    `generate(world, PROMPTS, before_step=adapters.scheduler(SCHEDULES), **SAMPLING)` (this module's top level
    imports only what that tree has, so the recording can be made again there)."""
    from safetensors.torch import load_file

    recorded = load_file(RECORDED)["clips"]
    clips = _generate()
    assert torch.equal(clips, recorded), float((clips - recorded).abs().max())
    # The recording depends on every control: without any one of them the clips differ.
    for without in ({"with_strengths": False}, {"camera": None}, {"steering": None}):
        assert not torch.allclose(_generate(**without), recorded, atol=1e-4), without

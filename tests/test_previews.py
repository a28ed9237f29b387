"""Sample previews while training (`OptimSettings.preview_every`, the `preview` callback): they do not change what is
learned, they sample with the adapters as they are, they are saved and indexed in the run's folder, a resumed run keeps
them, and the loss graph marks where they were taken."""

import json
from dataclasses import replace

import pytest
import torch
from builders import tiny_diffusers_wan
from PIL import Image

from custvid_core.backbones import describe
from custvid_core.backbones.memory import MemorySettings
from custvid_core.errors import InputError
from custvid_core.media import loss_plot
from custvid_core.training import MotionSettings, OptimSettings, SubjectSet, SubjectSettings, VideoSet, train_motion
from custvid_core.training import train_subject as _train_subject
from custvid_core.training.loop import PREVIEW_INDEX, PREVIEWS_FOLDER, PreviewClip
from custvid_core.world.sample import sample_flow


def _subject_set():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 1, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    return SubjectSet(torch.randn(3, 16, 1, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), masks)


def _settings(steps=4, preview_every=2, **optim):
    optim = OptimSettings(steps=steps, lr=1e-2, warmup=1, checkpoint_every=2, preview_every=preview_every, **optim)
    return SubjectSettings(rank=4, alignment_weight=0.0, alignment_block=1, optim=optim)


class Previewer:
    """A preview as a host makes one: seeds torch's own generator for its noise (as ComfyUI's does), samples two
    Euler steps with the backbone as it is, and shows the latents' first three channels as colours."""

    def __init__(self, backbone, context, seed=7):
        self.backbone, self.context, self.seed = backbone, context, seed
        self.latents, self.seen = [], []

    def __call__(self, step, parts):
        self.seen.append((step, torch.is_grad_enabled(), self.backbone.model.training, sorted(parts)))
        torch.manual_seed(self.seed)
        latents = sample_flow(self.backbone, self.context, None, torch.randn(1, 16, 1, 8, 8), steps=2,
                              progress=lambda *_: None)
        self.latents.append(latents)
        frames = torch.sigmoid(latents[0, :3]).permute(1, 2, 3, 0)  # [F, H, W, 3]
        return PreviewClip(frames, "a sks thing", self.seed)


def train_subject(data, settings, workdir=None, preview=None, **kw):
    backbone = describe(tiny_diffusers_wan())
    previewer = Previewer(backbone, data.context) if preview else None
    trained = _train_subject(backbone, data, settings, workdir, preview=previewer, **kw)
    return trained, previewer


def test_the_curve_with_previews_equals_the_curve_without_and_previews_see_the_adapters_as_they_are():
    data = _subject_set()
    torch.manual_seed(123)
    plain, _ = train_subject(data, _settings())
    after_plain = torch.get_rng_state()
    torch.manual_seed(123)
    previewed, previewer = train_subject(data, _settings(), preview=True)
    assert torch.equal(torch.get_rng_state(), after_plain)  # torch's own generator, as the run left it
    assert [r["loss"] for r in previewed.history] == [r["loss"] for r in plain.history]  # exactly
    assert all(torch.equal(previewed.tensors[k], v) for k, v in plain.tensors.items())
    # After steps 2 and 4, without gradients, in eval mode; the model is put back into its own mode after.
    assert [s[:3] for s in previewer.seen] == [(2, False, False), (4, False, False)]
    assert not previewer.backbone.model.training
    # The LoRA learns between the two previews: the second sample differs from the first (same seed).
    assert not torch.allclose(previewer.latents[0], previewer.latents[1])
    assert [r.get("preview") for r in previewed.history] == [None, "", None, ""]  # taken; no run folder to keep them


def test_previews_under_the_memory_savings_leave_the_curve_alone():
    """Checkpointing every other block, activations offloaded and a block swapped: a preview's forward (no gradient)
    goes through the same hooks and training goes on as without previews."""
    data = _subject_set()
    memory = MemorySettings(recompute_every=2, offload_activations=True, blocks_to_swap=1)
    settings = replace(_settings(), gradient_checkpointing=True, memory=memory)
    plain, _ = train_subject(data, settings)
    previewed, previewer = train_subject(data, settings, preview=True)
    assert [s[0] for s in previewer.seen] == [2, 4]
    assert [r["loss"] for r in previewed.history] == [r["loss"] for r in plain.history]
    assert all(torch.equal(previewed.tensors[k], v) for k, v in plain.tensors.items())


def test_previews_sample_without_the_throw_away_parts():
    """A motion run's spatial LoRA (thrown away at the end) is off in its previews; the motion LoRA is on."""
    g = torch.Generator().manual_seed(0)
    clips = VideoSet(torch.randn(2, 16, 3, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g))
    backbone = describe(tiny_diffusers_wan())
    seen = []

    def preview(step, parts):
        seen.append({n: p.strength for n, p in parts.items() if hasattr(p, "strength")})
        return PreviewClip(torch.zeros(1, 8, 8, 3), "", 0)

    settings = MotionSettings(rank=4, spatial_rank=4, alignment_weight=0.0, alignment_block=1,
                              optim=_settings(steps=2, preview_every=1).optim)
    train_motion(backbone, clips, settings, preview=preview)
    assert seen and all(s["motion_spatial"] == 0.0 and s["motion"] == 1.0 for s in seen)


def test_previews_are_saved_and_indexed_and_the_loss_log_says_where(tmp_path):
    trained, _ = train_subject(_subject_set(), _settings(), tmp_path, preview=True)
    folder = tmp_path / PREVIEWS_FOLDER
    index = json.loads((folder / PREVIEW_INDEX).read_text())
    assert index == [{"step": s, "file": f"previews/step_{s:06d}.webp", "prompt": "a sks thing", "seed": 7}
                     for s in (2, 4)]
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "step_000002.webp", "step_000004.webp"]
    with Image.open(folder / "step_000004.webp") as image:
        assert image.format == "WEBP" and image.size == (8, 8)
    assert [r.get("preview") for r in trained.history] == [None, index[0]["file"], None, index[1]["file"]]


def test_a_resumed_run_keeps_its_earlier_previews_and_retakes_later_ones(tmp_path):
    data = _subject_set()
    settings = _settings(steps=4, preview_every=1)

    class Interrupted(Exception):
        pass

    def stop_at_three(step, total, record):
        if step == 3:  # after step 3's preview; its checkpoint is step 2's
            raise Interrupted

    with pytest.raises(Interrupted):
        train_subject(data, settings, tmp_path, preview=True, progress=stop_at_three)
    first = (tmp_path / "previews" / "step_000001.webp").read_bytes()
    assert (tmp_path / "previews" / "step_000003.webp").exists()
    logs = []
    resumed, previewer = train_subject(data, replace(settings, optim=replace(settings.optim, steps=5)), tmp_path,
                                       preview=True, log=logs.append)
    assert logs == ["resumed from step 2 of 5"] and [s[0] for s in previewer.seen] == [3, 4, 5]
    index = json.loads((tmp_path / "previews" / PREVIEW_INDEX).read_text())
    assert [e["step"] for e in index] == [1, 2, 3, 4, 5]
    assert (tmp_path / "previews" / "step_000001.webp").read_bytes() == first
    assert all(r["preview"] == f"previews/step_{r['step']:06d}.webp" for r in resumed.history)

    # Already trained: nothing is sampled, and the history still marks every preview.
    again, previewer = train_subject(data, replace(settings, optim=replace(settings.optim, steps=5)), tmp_path,
                                     preview=True)
    assert previewer.seen == [] and again.history == resumed.history

    # Another run in the same folder trains afresh: the previews of the run before go with it.
    train_subject(data, replace(settings, optim=replace(settings.optim, lr=2e-2, steps=2)), tmp_path,
                             preview=True)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["index.json", "step_000001.webp",
                                                                          "step_000002.webp"]
    assert [e["step"] for e in json.loads((tmp_path / "previews" / PREVIEW_INDEX).read_text())] == [1, 2]


def test_an_interrupt_during_a_preview_keeps_the_steps_checkpoint(tmp_path):
    data = _subject_set()
    backbone = describe(tiny_diffusers_wan())

    class Interrupted(Exception):
        pass

    def interrupted(step, parts):
        raise Interrupted

    with pytest.raises(Interrupted):
        _train_subject(backbone, data, _settings(), tmp_path, preview=interrupted)
    assert backbone.model.training is False and torch.is_grad_enabled()
    logs = []
    train_subject(data, _settings(), tmp_path, log=logs.append)
    assert logs == ["resumed from step 2 of 4"]


def test_preview_every_is_validated_and_not_part_of_what_a_checkpoint_matches(tmp_path):
    with pytest.raises(InputError, match="preview_every"):
        OptimSettings(preview_every=-1)
    data = _subject_set()
    train_subject(data, _settings(preview_every=0), tmp_path)
    logs = []
    train_subject(data, _settings(steps=6, preview_every=3), tmp_path, preview=True, log=logs.append)
    assert logs == ["resumed from step 4 of 6"]


def test_the_loss_graph_marks_the_preview_steps():
    history = [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(20)]
    marked = [dict(r, preview="previews/x.webp") if r["step"] in (5, 15) else r for r in history]
    plain, graph = loss_plot(history), loss_plot(marked)
    changed = (graph != plain).any(-1)[0]  # [H, W]
    columns = changed.any(0).nonzero().flatten()
    assert len(columns) > 0
    # Only near the two steps' columns (x of step s: 24 + 464 * (s - 1) / 19 on a 512-wide graph).
    expected = [24 + 464 * (s - 1) / 19 for s in (5, 15)]
    assert all(min(abs(float(c) - x) for x in expected) <= 3 for c in columns)
    assert changed[:, round(expected[0])].sum() > 100  # a line across the graph's height

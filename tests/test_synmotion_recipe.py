"""SynMotion's recipe: the draw between the clips and the prior clips, which groups each step moves, the prior
prompts' positions, the ablations, resume and refusals, on a tiny diffusers Wan."""

from dataclasses import replace

import pytest
import torch
from builders import tiny_diffusers_wan

from custvid_core.adapters.synmotion import LearnedSynMotion, RolePositions
from custvid_core.backbones import describe
from custvid_core.errors import InputError
from custvid_core.training import OptimSettings, VideoSet, engine
from custvid_core.training.prior_clips import PriorClips, PriorPrompt
from custvid_core.training.synmotion import (
    SynMotionSettings,
    prior_subject_positions,
    synmotion_recipe,
    train_synmotion,
)

MODEL = "model-fingerprint"
# The clips' prompt "<subject> <subject> <motion> <motion>"; the prior prompts' subjects of one and of two words.
POSITIONS = RolePositions(subject=(0, 1), motion=(2, 3))
PRIOR_PROMPTS = (PriorPrompt("cat", "walking"), PriorPrompt("red horse", "running"))


def _data():
    g = torch.Generator().manual_seed(0)
    clips = VideoSet(torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 6, 64, generator=g))
    prior = PriorClips(torch.randn(3, 16, 2, 8, 8, generator=g), torch.randn(3, 6, 64, generator=g),
                       prompts=(PRIOR_PROMPTS[0], PRIOR_PROMPTS[1], PRIOR_PROMPTS[0]), base_model=MODEL)
    return clips, prior, torch.randn(2, 64, generator=g)


def _find(prompt: PriorPrompt):
    return tuple(range(len(prompt.subject.split())))


def _settings(steps=8, **kw):
    return SynMotionSettings(rank=4, optim=OptimSettings(steps=steps, lr=1e-2, warmup=0, checkpoint_every=2), **kw)


def _recipe(backbone, settings, data=None, **kw):
    clips, prior, phrase = data or _data()
    args = dict(prior_subjects=prior_subject_positions(prior, _find), prior_model=MODEL, motion_words="mtn")
    return synmotion_recipe(backbone, clips, POSITIONS, phrase, prior, settings, **{**args, **kw})


def _params(recipe):
    embeddings, lora = recipe.parts
    groups = {**embeddings.groups(), **lora.groups()}
    return {n: [p.detach().clone() for p in ps] for n, ps in groups.items()}


def _run_recording(settings):
    """Run the recipe; per step from the second on: its task, the positions the embeddings part edited, and the
    groups that moved in it (the first step has no values before it to compare with)."""
    backbone = describe(tiny_diffusers_wan())
    recipe = _recipe(backbone, settings)
    embeddings = recipe.parts[0]
    steps, before = [], {}

    def record(step, total, rec):
        now = _params(recipe)
        if before:
            moved = {n for n in now if any(not torch.equal(a, b) for a, b in zip(now[n], before[n]))}
            steps.append(("motion" if "motion" in rec else "prior", embeddings.positions, moved))
        before.update(now)

    (trained,) = engine.run(backbone, [recipe], recipe.schedule, settings.optim, progress=record)
    return steps, trained


def test_a_quarter_of_the_steps_on_average_are_prior_steps_drawn_from_the_runs_generator():
    backbone = describe(tiny_diffusers_wan())
    recipe = _recipe(backbone, _settings())
    g = torch.Generator().manual_seed(0)
    drawn = []
    for i in range(2000):
        drawn.append(recipe.schedule.at(i, g).name)
    share = drawn.count("prior") / len(drawn)
    assert abs(share - 0.25) < 0.03, share
    assert set(drawn) == {"motion", "prior"}


def test_motion_steps_move_both_embeddings_and_the_lora_and_prior_steps_the_subject_alone_at_its_own_words():
    steps, trained = _run_recording(_settings(8))
    tasks = [t for t, _, _ in steps]
    assert set(tasks) == {"motion", "prior"}, tasks  # seed 0 draws both within 8 steps
    for task, positions, moved in steps:
        if task == "motion":
            assert positions == POSITIONS
            assert moved == {"synmotion_subject", "synmotion_motion", "synmotion_lora"}
        else:
            assert positions.motion == () and positions.subject in {(0,), (0, 1)}  # a prior prompt's subject words
            assert moved == {"synmotion_subject"}
    assert set(trained.parts) == {"synmotion", "synmotion_lora"} and trained.main == "synmotion_lora"
    learned = LearnedSynMotion.from_exported(trained.parts["synmotion"])
    assert learned.motion_residual.abs().max() > 0 and learned.refiner is not None
    assert learned.motion_words == "mtn" and learned.subject_tokens == 2
    assert trained.spec.rank == 4 and trained.tensors


def test_prior_steps_take_each_prior_clips_own_prompts_subject_positions():
    seen = []
    backbone = describe(tiny_diffusers_wan())
    settings = _settings(40)
    recipe = _recipe(backbone, settings)
    embeddings = recipe.parts[0]
    forward = backbone.forward

    def spy(x, sigma, context):
        seen.append((embeddings.positions, context[0, 0].clone()))
        return forward(x, sigma, context)

    backbone.forward = spy
    engine.run(backbone, [recipe], recipe.schedule, settings.optim)
    _, prior, _ = _data()
    checked = 0
    for positions, row in seen:
        if positions.motion:
            continue
        clip = next(i for i in range(3) if torch.equal(prior.context[i, 0], row))  # the step's prior clip
        assert positions.subject == _find(prior.prompts[clip])
        checked += 1
    assert checked


def test_without_alternation_prior_steps_move_everything():
    steps, _ = _run_recording(_settings(8, alternation=False))
    assert {t for t, _, _ in steps} == {"motion", "prior"}
    assert all(moved == {"synmotion_subject", "synmotion_motion", "synmotion_lora"} for _, _, moved in steps)


def test_without_prior_clips_every_step_is_a_motion_step_and_none_are_needed():
    backbone = describe(tiny_diffusers_wan())
    clips, _, phrase = _data()
    settings = _settings(6, prior=False)
    recipe = synmotion_recipe(backbone, clips, POSITIONS, phrase, None, settings)
    assert recipe.schedule.name == "motion"
    steps, _ = _run_recording(settings)
    assert {t for t, _, _ in steps} == {"motion"}


def test_without_the_refiner_none_is_trained_or_exported():
    _, trained = _run_recording(_settings(4, refiner=False))
    learned = LearnedSynMotion.from_exported(trained.parts["synmotion"])
    assert learned.refiner is None and learned.motion_residual.abs().max() > 0


def test_a_stopped_run_resumes_bit_identically(tmp_path):
    clips, prior, phrase = _data()
    settings = _settings(6)
    kw = dict(prior_subjects=prior_subject_positions(prior, _find), prior_model=MODEL)
    full = train_synmotion(describe(tiny_diffusers_wan()), clips, POSITIONS, phrase, prior, settings,
                           workdir=tmp_path / "a", **kw)

    class Interrupted(Exception):
        pass

    def stop_after_four(step, total, record):
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_synmotion(describe(tiny_diffusers_wan()), clips, POSITIONS, phrase, prior, settings,
                        workdir=tmp_path / "b", progress=stop_after_four, **kw)
    logs = []
    resumed = train_synmotion(describe(tiny_diffusers_wan()), clips, POSITIONS, phrase, prior, settings,
                              workdir=tmp_path / "b", log=logs.append, **kw)
    assert logs == ["resumed from step 4 of 6"]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for name, part in full.parts.items():
        assert all(torch.equal(v, resumed.parts[name].tensors[k]) for k, v in part.tensors.items())
    logs.clear()
    other = {**kw, "prior_subjects": [(0, 1)] * 3}  # other positions are other data
    train_synmotion(describe(tiny_diffusers_wan()), clips, POSITIONS, phrase, prior, settings,
                    workdir=tmp_path / "b", log=logs.append, **other)
    assert logs and logs[0].startswith("trained afresh")


@pytest.mark.parametrize("change, input_name", [
    (dict(positions=RolePositions(subject=(0, 1))), "motion_words"),
    (dict(positions=[POSITIONS, RolePositions(subject=(0,), motion=(1, 2, 3))]), "motion_words"),
    (dict(prior_model="another model"), "prior_clips"),
    (dict(prior_model=None), "prior_clips"),
    (dict(prior=None), "prior_clips"),
    (dict(prior_subjects=[(0,), ()]), "prior_clips"),
    (dict(prior_subjects=[(0,), (), (0,)]), "prior_clips"),
    (dict(settings=_settings(motion_probability=1.0)), "motion_probability"),
])
def test_bad_input_is_refused_naming_the_input(change, input_name):
    backbone = describe(tiny_diffusers_wan())
    clips, prior, phrase = _data()
    args = dict(clips=clips, positions=POSITIONS, motion_phrase=phrase, prior=prior, settings=_settings(),
                prior_subjects=prior_subject_positions(prior, _find), prior_model=MODEL)
    with pytest.raises(InputError) as e:
        synmotion_recipe(backbone, **{**args, **change})
    assert e.value.input_name == input_name


def test_prior_clips_of_another_size_are_refused():
    backbone = describe(tiny_diffusers_wan())
    clips, prior, phrase = _data()
    small = replace(prior, latents=prior.latents[..., :4, :4])
    with pytest.raises(InputError) as e:
        synmotion_recipe(backbone, clips, POSITIONS, phrase, small, _settings(),
                         prior_subjects=[(0,)] * 3, prior_model=MODEL)
    assert e.value.input_name == "prior_clips"


def test_one_conditioning_row_for_every_clip_is_each_clips_conditioning():
    """A clip set whose one prompt stands for all its clips (`VideoSet` allows `[1, L, D]`) trains every clip with
    that prompt, not an empty conditioning for the clips after the first."""
    backbone = describe(tiny_diffusers_wan())
    clips, _, phrase = _data()
    one_prompt = VideoSet(clips.latents, clips.context[:1])
    settings = _settings(steps=6, prior=False)
    recipe = synmotion_recipe(backbone, one_prompt, POSITIONS, phrase, None, settings)
    seen = []
    forward = backbone.forward

    def recording(x, sigma, context, *args, **kwargs):
        seen.append(context.shape[0])
        return forward(x, sigma, context, *args, **kwargs)

    backbone.forward = recording
    engine.run(backbone, [recipe], recipe.schedule, settings.optim)
    assert seen and set(seen) == {1}

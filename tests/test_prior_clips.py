import pytest
import torch

from custvid_core.errors import InputError
from custvid_core.files import save_safetensors
from custvid_core.training.datasets import VideoSet, append_clips
from custvid_core.training.prior_clips import (
    KIND,
    PriorPrompt,
    PriorSettings,
    cache_file,
    cache_key,
    load_prior_clips,
    parse_prior_prompts,
    prior_clips,
    prompts_text,
    shipped_prior_prompts,
)

PROMPTS = [PriorPrompt("a dog", "walking"), PriorPrompt("a cat", "sitting")]
SETTINGS = PriorSettings(count=3, seed=7, width=16, height=8, frames=5, steps=2, cfg=5.0)


class Sampler:
    """A stand-in for a frozen model's sampler: latents that say which prompt and seed made them; counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt_index: int, seed: int) -> torch.Tensor:
        self.calls.append((prompt_index, seed))
        return torch.full((1, 4, 2, 3, 5), 100.0 * prompt_index + seed)


def encode_text(prompts):
    """Conditioning of 6 rows, 8 wide, padded with zeros after the prompt's word count (as umt5's is)."""
    out = torch.zeros(len(prompts), 6, 8)
    for i, p in enumerate(prompts):
        out[i, :len(p.split())] = len(p)
    return out


def test_clips_are_generated_once_per_index_with_their_own_seed_then_read_from_the_cache(tmp_path):
    sampler, done = Sampler(), []
    clips = prior_clips(sampler, PROMPTS, encode_text, SETTINGS, "model-a", tmp_path,
                        progress=lambda d, t: done.append((d, t)))
    # Clip k: prompt k % 2, noise seed 7 + k.
    assert sampler.calls == [(0, 7), (1, 8), (0, 9)] and done == [(1, 3), (2, 3), (3, 3)]
    assert isinstance(clips, VideoSet) and clips.latents.shape == (3, 4, 2, 3, 5)
    assert [float(c.flatten()[0]) for c in clips.latents] == [7.0, 108.0, 9.0]
    assert torch.equal(clips.context, encode_text(["a dog walking", "a cat sitting", "a dog walking"]))
    assert [p.text for p in clips.prompts] == ["a dog walking", "a cat sitting", "a dog walking"]
    assert clips.base_model == "model-a"
    assert list(tmp_path.iterdir()) == [cache_file(tmp_path, cache_key(PROMPTS, SETTINGS, "model-a"))]

    again = prior_clips(Sampler(), PROMPTS, encode_text, SETTINGS, "model-a", tmp_path, progress=lambda d, t: None)
    assert torch.equal(again.latents, clips.latents) and torch.equal(again.context, clips.context)
    assert again.prompts == clips.prompts
    # Used like any clips set.
    assert append_clips(clips, again).latents.shape[0] == 6


@pytest.mark.parametrize("change", [
    dict(base_model="model-b"), dict(prompts=PROMPTS[::-1]), dict(settings=dict(count=4)),
    dict(settings=dict(seed=8)), dict(settings=dict(width=32)), dict(settings=dict(height=16)),
    dict(settings=dict(frames=9)), dict(settings=dict(steps=3)), dict(settings=dict(cfg=4.0)),
    dict(settings=dict(sampling=(("sampler", "euler"),))),
])
def test_a_cache_of_another_model_prompts_or_setting_is_not_reused(tmp_path, change):
    prior_clips(Sampler(), PROMPTS, encode_text, SETTINGS, "model-a", tmp_path, progress=lambda d, t: None)
    settings = PriorSettings(**{**SETTINGS.__dict__, **change.get("settings", {})})
    sampler = Sampler()
    prior_clips(sampler, change.get("prompts", PROMPTS), encode_text, settings, change.get("base_model", "model-a"),
                tmp_path, progress=lambda d, t: None)
    assert len(sampler.calls) == settings.count


def test_another_models_cache_is_refused_naming_the_input(tmp_path):
    clips = prior_clips(Sampler(), PROMPTS, encode_text, SETTINGS, "model-a", tmp_path, progress=lambda d, t: None)
    path = cache_file(tmp_path, cache_key(PROMPTS, SETTINGS, "model-a"))
    assert torch.equal(load_prior_clips(path, "model-a").latents, clips.latents)
    with pytest.raises(InputError) as refused:
        load_prior_clips(path, "model-b", "prior_clips")
    assert refused.value.input_name == "prior_clips" and "another base model" in str(refused.value)
    clips.require_model("model-a")
    with pytest.raises(InputError) as refused:
        clips.require_model("model-b")
    assert refused.value.input_name == "prior_clips"


def test_an_empty_cache_another_file_and_an_empty_prompt_list_are_refused(tmp_path):
    empty = tmp_path / "empty.safetensors"
    save_safetensors(empty, {"latents": torch.zeros(0, 4, 2, 3, 5), "context": torch.zeros(0, 6, 8),
                             "prompt_index": torch.zeros(0, dtype=torch.long)},
                     {"custvid.kind": KIND, "custvid.version": 1, "custvid.base_model": "model-a", "custvid.prompts": []})
    with pytest.raises(InputError, match="holds no clips") as refused:
        load_prior_clips(empty, "model-a")
    assert refused.value.input_name == "prior_clips"
    other = tmp_path / "lora.safetensors"
    save_safetensors(other, {"latents": torch.zeros(1, 4, 2, 3, 5)})
    with pytest.raises(InputError, match="not a subject prior clips file"):
        load_prior_clips(other)
    with pytest.raises(InputError) as refused:
        prior_clips(Sampler(), [], encode_text, SETTINGS, "model-a", tmp_path)
    assert refused.value.input_name == "prompts"
    for text in ("", "# only a comment\n\n", "a dog walking", "a dog |", "| walking", "a | b | c"):
        with pytest.raises(InputError) as refused:
            parse_prior_prompts(text)
        assert refused.value.input_name == "prompts"
    with pytest.raises(InputError) as refused:
        PriorSettings(count=0)
    assert refused.value.input_name == "count"


def test_an_interrupted_generation_leaves_no_cache_and_clips_of_another_shape_are_refused(tmp_path):
    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prior_clips(Sampler(), PROMPTS, encode_text, SETTINGS, "model-a", tmp_path, progress=interrupt)
    assert not list(tmp_path.iterdir())

    def uneven(prompt_index, seed):
        return torch.zeros(4, 2, 3, 5 + prompt_index)

    with pytest.raises(InputError) as refused:
        prior_clips(uneven, PROMPTS, encode_text, SETTINGS, "model-a", tmp_path, progress=lambda d, t: None)
    assert refused.value.input_name == "generate" and not list(tmp_path.iterdir())


def test_the_shipped_prompts_keep_subject_and_action_apart_and_read_back_from_their_text():
    prompts = shipped_prior_prompts()
    assert len(prompts) >= 16 and len({p.subject for p in prompts}) == len(prompts)
    assert all(p.subject.split()[0] in ("a", "an") and p.action and "|" not in p.text for p in prompts)
    assert parse_prior_prompts(prompts_text(prompts)) == prompts

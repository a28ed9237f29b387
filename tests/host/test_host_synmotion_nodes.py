"""SynMotion's embedding nodes in ComfyUI (in-process from COMFYUI_PATH), on the shapes world's CLIP: Apply edits only
the motion rows (and the subject rows when asked) as the library's `with_embeddings` does, Save / Load keep them, and
bad input is refused with the input named."""

import pytest
import torch
from comfy_host import import_comfy, import_pack
from world_data import encode

from custvid_core.adapters.synmotion import LearnedSynMotion, RolePositions, new_refiner, with_embeddings
from custvid_core.files import save_safetensors
from custvid_core.world.model import load_world

PROMPT = "a blue square moving left"  # the world's tokenizer: one token per word, so a=0 ... left=4


def _learned(text_dim=4096, seed=0):
    """Embeddings as training leaves them: every residual and the refiner's output nonzero."""
    g = torch.Generator().manual_seed(seed)
    refiner = new_refiner(text_dim, seed)
    with torch.no_grad():
        refiner.out.weight.copy_(torch.randn(refiner.out.weight.shape, generator=g) * 0.05)
    return LearnedSynMotion(torch.randn(1, text_dim, generator=g), torch.randn(2, text_dim, generator=g),
                            {k: v.clone() for k, v in refiner.state_dict().items()}, "red circle", "moving left", 2)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    import_comfy()
    import folder_paths

    import_pack()
    from custvid_pack.nodes import synmotion_nodes, world_nodes

    folder = tmp_path_factory.mktemp("synmotion")
    folder_paths.add_model_folder_path("custvid_synmotion", str(folder), is_default=True)
    return synmotion_nodes, world_nodes.world_clip(load_world().text), folder


def test_applied_to_a_new_subject_it_edits_the_motion_rows_as_the_library_does(host):
    nodes, clip, _ = host
    learned = _learned()
    conditioning = encode(clip, PROMPT)
    before = conditioning[0][0].clone()

    applied = nodes.ApplySynMotionEmbeddings.execute(conditioning, learned, clip, PROMPT).result[0]
    assert torch.equal(conditioning[0][0], before)  # the input conditioning is not changed
    assert applied[0][1].keys() == conditioning[0][1].keys()
    changed = (applied[0][0] - before).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [3, 4]
    expected = with_embeddings(before, RolePositions(motion=(3, 4)), learned)
    assert torch.allclose(applied[0][0], expected, atol=1e-6)

    # With `subject`, the subject residual goes to the prompt's subject words too (given, or the trained ones).
    both = nodes.ApplySynMotionEmbeddings.execute(conditioning, learned, clip, PROMPT, subject_words="blue square",
                                                  subject=True).result[0]
    changed = (both[0][0] - before).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [1, 2, 3, 4]
    expected = with_embeddings(before, RolePositions((1, 2), (3, 4)), learned, subject=True)
    assert torch.allclose(both[0][0], expected, atol=1e-6)
    trained_words = nodes.ApplySynMotionEmbeddings.execute(encode(clip, "a red circle moving left"), learned, clip,
                                                           "a red circle moving left", subject=True).result[0]
    assert ((trained_words[0][0] - encode(clip, "a red circle moving left")[0][0]).abs().sum(-1)[0] > 0).sum() == 4

    # Strength 0 leaves the conditioning as the text encoder gave it.
    zero = nodes.ApplySynMotionEmbeddings.execute(conditioning, learned, clip, PROMPT, strength=0.0).result[0]
    assert torch.equal(zero[0][0], before)


def test_saved_and_loaded_embeddings_apply_as_before(host):
    nodes, clip, folder = host
    learned = _learned(seed=3)
    name = nodes.SaveSynMotionEmbeddings.execute(learned, "custvid/left", False).result[0]
    assert name == "custvid/left.safetensors"
    loaded = nodes.LoadSynMotionEmbeddings.execute(name).result[0]
    assert (loaded.subject_words, loaded.motion_words, loaded.subject_tokens) == ("red circle", "moving left", 2)
    assert torch.equal(loaded.subject_residual, learned.subject_residual)
    assert torch.equal(loaded.motion_residual, learned.motion_residual)
    assert loaded.refiner.keys() == learned.refiner.keys()
    assert all(torch.equal(loaded.refiner[k], learned.refiner[k]) for k in learned.refiner)
    conditioning = encode(clip, PROMPT)
    apply = nodes.ApplySynMotionEmbeddings.execute
    assert torch.equal(apply(conditioning, loaded, clip, PROMPT, subject=True, subject_words="blue square").result[0][0][0],
                       apply(conditioning, learned, clip, PROMPT, subject=True, subject_words="blue square").result[0][0][0])

    # An existing name is kept unless overwrite is on.
    saved = (folder / "custvid" / "left.safetensors").read_bytes()
    with pytest.raises(ValueError, match="filename: 'custvid/left.safetensors' already exists"):
        nodes.SaveSynMotionEmbeddings.execute(_learned(seed=4), "custvid/left", False)
    assert (folder / "custvid" / "left.safetensors").read_bytes() == saved
    nodes.SaveSynMotionEmbeddings.execute(_learned(seed=4), "custvid/left", True)
    assert (folder / "custvid" / "left.safetensors").read_bytes() != saved


def test_bad_input_is_refused_with_the_input_named(host):
    nodes, clip, folder = host
    learned = _learned()
    conditioning = encode(clip, PROMPT)
    apply = nodes.ApplySynMotionEmbeddings.execute
    with pytest.raises(ValueError, match="motion_words: 'right' is not in the prompt"):
        apply(conditioning, learned, clip, PROMPT, motion_words="moving right")
    with pytest.raises(ValueError, match="motion_words: 'left' is not in the prompt"):  # the trained words, by default
        apply(encode(clip, "a blue square moving up"), learned, clip, "a blue square moving up")
    with pytest.raises(ValueError, match=r"motion_words: 'moving' is 1 tokens in this prompt.*2 tokens"):
        apply(conditioning, learned, clip, PROMPT, motion_words="moving")
    with pytest.raises(ValueError, match="synmotion_embeddings: width 8 on conditioning of width 4096"):
        apply(conditioning, _learned(text_dim=8), clip, PROMPT)
    with pytest.raises(ValueError, match="subject_words: 'green' is not in the prompt"):
        apply(conditioning, learned, clip, PROMPT, subject_words="green star", subject=True)
    with pytest.raises(ValueError, match="prompt: it is empty"):
        apply(conditioning, learned, clip, " ")

    (folder / "other").mkdir(exist_ok=True)
    save_safetensors(folder / "other" / "lora.safetensors", {"lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="synmotion_embeddings_name: 'lora.safetensors' is not a CustVid SynMotion"):
        nodes.LoadSynMotionEmbeddings.execute("other/lora.safetensors")


def test_motion_words_that_tokenize_otherwise_than_in_training_are_refused(host):
    """Each learned motion row belongs to one token of the trained words ('moving left'): other words of as many
    tokens, or the trained words in another order, would put the rows on tokens they were not learned on."""
    nodes, clip, _ = host
    learned = _learned()
    apply = nodes.ApplySynMotionEmbeddings.execute
    other_words = "a blue square moving right"
    with pytest.raises(ValueError, match="motion_words: 'moving right' tokenizes in this prompt to other tokens than "
                                         "the words it was trained at \\('moving left'\\)"):
        apply(encode(clip, other_words), learned, clip, other_words, motion_words="moving right")
    reordered = "a blue square left moving"
    with pytest.raises(ValueError, match="motion_words: 'moving left' tokenizes .* or to the same in another order"):
        apply(encode(clip, reordered), learned, clip, reordered)
    # Written as in training, the words may sit anywhere in a new prompt.
    moved = "moving left a blue square"
    applied = apply(encode(clip, moved), learned, clip, moved).result[0]
    changed = (applied[0][0] - encode(clip, moved)[0][0]).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [0, 1]

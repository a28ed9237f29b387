"""Camera by latent shift and box steering inside ComfyUI's own sampling (tiny world-layout Wan loaded by
ComfyUI, in-process), checked against the library's world sampler on the same weights."""

import pytest
import torch
from comfy_host import import_pack, tiny_world, tiny_world_wan
from world_data import encode

from custvid_core.control.boxes import BoxSteering, BoxTrack, PromptSteering
from custvid_core.control.camera import CameraPath, LatentShift, StepWindow
from custvid_core.control.sampling import SamplingControl, SamplingStep, cross_attention_hook
from custvid_core.world.sample import flow_sigmas, generate
from custvid_core.world.text import WorldTextEncoder

PROMPT = "red striped circle moving right"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    patcher, world, _ = tiny_world_wan(tmp_path_factory.mktemp("tiny_wan_control"))
    world.text = WorldTextEncoder()
    world.clip = import_pack().nodes.world_nodes.world_clip(world.text)  # as Load Shapes World gives it
    return patcher, world, import_pack().nodes.control_nodes


def _comfy_sample(patcher, sampler, world, steps=6, cfg=3.0, seed=0, part=None, latent=None, add_noise=True):
    """ComfyUI's sampling on the world schedule; `part` (start, end) runs only those steps, as one of
    Wan 2.2's two experts does."""
    import comfy.sample

    positive, negative = encode(world.clip, PROMPT), encode(world.clip, "")
    latent = torch.zeros(1, 16, 1, 32, 32) if latent is None else latent
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = flow_sigmas(steps, 3.0)
    if part is not None:
        sigmas = sigmas[part[0]:part[1] + 1]
    return comfy.sample.sample_custom(patcher, noise if add_noise else torch.zeros_like(noise), cfg, sampler, sigmas,
                                      positive, negative, latent, disable_pbar=True, seed=seed)


class _Record(SamplingControl):
    """Keeps every step it is shown and the latent after the last one."""

    def __init__(self):
        self.steps, self.latent = [], None

    def before_step(self, step):
        self.steps.append(step)

    def after_step(self, step, x):
        self.latent = x
        return x


def _library_latents(world, steps=6, cfg=3.0, seed=0, **controls):
    record = _Record()
    generate(world, [PROMPT], seed=seed, steps=steps, cfg=cfg, shift=3.0, controls=[record],
             progress=lambda *_: None, **controls)
    return record.latent


def _normalise_out(latent):
    import comfy.latent_formats

    return comfy.latent_formats.Wan21().process_in(latent)


def test_camera_sampler_shifts_as_the_library_does_and_wraps_any_sampler(tiny):
    import comfy.samplers

    patcher, world, nodes = tiny
    euler = comfy.samplers.sampler_object("euler")
    node = nodes.CameraShiftSamplerV2
    # The layout is the world's, read from the conditioning its clip made; fill seed 0 as generate uses.
    shifted = node.execute(euler, 0.25, 0.0, 1.0, "", 0.2, 0.6, 0).result[0]
    ours = _normalise_out(_comfy_sample(patcher, shifted, world))
    plain = _normalise_out(_comfy_sample(patcher, euler, world))
    expected = _library_latents(world, camera=CameraPath.constant(0.25, 0.0), camera_window=StepWindow(0.2, 0.6))
    unshifted = _library_latents(world)
    assert torch.allclose(plain, unshifted, atol=1e-3)  # the same sampler on both sides
    assert torch.allclose(ours, expected, atol=1e-3)
    assert not torch.allclose(ours, plain, atol=1e-2)
    # A multistep and a stochastic sampler run through the wrapper too.
    for name in ("uni_pc", "euler_ancestral"):
        wrapped = node.execute(comfy.samplers.sampler_object(name), 0.0, 0.2, 1.2, "", 0.2, 0.6, 0)
        assert torch.isfinite(_comfy_sample(patcher, wrapped.result[0], world)).all()


def test_the_deprecated_camera_sampler_keeps_its_layout_choice(tiny):
    """Saved workflows choose the layout on the deprecated node; the same choice gives what the new node reads
    from the world's conditioning, and the other choice does not."""
    import comfy.samplers

    patcher, world, nodes = tiny
    euler = comfy.samplers.sampler_object("euler")
    detected = nodes.CameraShiftSamplerV2.execute(euler, 0.25, 0.0, 1.0, "", 0.2, 0.6, 0).result[0]
    chosen = {layout: nodes.CameraShiftSampler.execute(euler, 0.25, 0.0, 1.0, "", 0.2, 0.6, layout, 0).result[0]
              for layout in (nodes.WORLD_LAYOUT, nodes.VIDEO_LAYOUT)}
    ours = _comfy_sample(patcher, detected, world)
    assert torch.equal(ours, _comfy_sample(patcher, chosen[nodes.WORLD_LAYOUT], world))
    assert not torch.allclose(ours, _comfy_sample(patcher, chosen[nodes.VIDEO_LAYOUT], world), atol=1e-2)


def test_a_wan22_latent_with_48_channels_is_shifted_per_latent_frame_in_comfys_sampling(tiny, tmp_path):
    """A tiny Wan 2.2 (48 latent channels; ComfyUI loads it as WAN22): shifting during the last step only,
    the wrapped sampler's result is the plain sampler's result moved by the library's LatentShift."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from custvid_core.world.model import save_world

    _, _, nodes = tiny
    world = tiny_world(layers=1, in_channels=48, out_channels=48)
    save_world(world, tmp_path / "wan22.safetensors", tmp_path / "text.safetensors")
    patcher = comfy.sd.load_diffusion_model(str(tmp_path / "wan22.safetensors"))
    assert type(patcher.model).__name__ == "WAN22"
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        positive, negative = [[world.text(PROMPT), {}]], [[world.text(""), {}]]
    latent = torch.zeros(1, 48, 3, 8, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(4, 3.0)
    euler = comfy.samplers.sampler_object("euler")
    shifted = nodes.CameraShiftSamplerV2.execute(euler, 0.25, 0.0, 1.0, "", 0.75, 1.0, 3).result[0]

    def sample(sampler):
        return comfy.sample.sample_custom(patcher, noise, 3.0, sampler, sigmas, positive, negative, latent,
                                          disable_pbar=True, seed=0)
    ours, plain = sample(shifted), sample(euler)
    mover = LatentShift(CameraPath.constant(0.25, 0.0), 4, 3, StepWindow(0.75, 1.0), seed=3)
    assert torch.allclose(ours, mover.after_step(SamplingStep.of(3, sigmas), plain), atol=1e-5)
    # The last latent frame moved 4 cells left, every channel with it.
    assert torch.allclose(ours[:, :, 2, :, :12], plain[:, :, 2, :, 4:], atol=1e-5)


def test_two_expert_graphs_shift_inside_the_expert_that_holds_the_window(tiny):
    import comfy.samplers

    patcher, world, nodes = tiny
    euler = comfy.samplers.sampler_object("euler")
    # High-noise expert: steps 0-3 of 6, its window 0.25-0.75 = its steps 1-2; the low-noise expert: steps 4-5.
    camera = nodes.CameraShiftSamplerV2.execute(euler, 0.25, 0.0, 1.0, "", 0.25, 0.75, 0).result[0]
    high = _comfy_sample(patcher, camera, world, part=(0, 4))
    both = _normalise_out(_comfy_sample(patcher, euler, world, part=(4, 6), latent=high, add_noise=False))
    expected = _library_latents(world, camera=CameraPath.constant(0.25, 0.0), camera_window=StepWindow(1 / 6, 0.5))
    assert torch.allclose(both, expected, atol=1e-3)


def test_given_the_whole_schedule_a_window_spans_both_experts(tiny):
    import comfy.samplers

    patcher, world, nodes = tiny
    euler = comfy.samplers.sampler_object("euler")
    whole = flow_sigmas(6, 3.0)
    # The window is steps 2-4 of 6; the experts split at step 4, so each makes part of the move.
    settings = (0.25, 0.0, 1.0, "", 2 / 6, 5 / 6, 0)
    camera = nodes.CameraShiftSamplerV2.execute(euler, *settings, schedule=whole).result[0]
    high = _comfy_sample(patcher, camera, world, part=(0, 4))
    both = _normalise_out(_comfy_sample(patcher, camera, world, part=(4, 6), latent=high, add_noise=False))
    expected = _library_latents(world, camera=CameraPath.constant(0.25, 0.0), camera_window=StepWindow(2 / 6, 5 / 6))
    assert torch.allclose(both, expected, atol=1e-3)
    with pytest.raises(ValueError, match="schedule:"):
        other = nodes.CameraShiftSamplerV2.execute(euler, *settings, schedule=flow_sigmas(8, 3.0)).result[0]
        _comfy_sample(patcher, other, world, part=(0, 4))


def test_all_in_one_camera_sampler_is_the_wrapped_sampler_on_a_video_latent(tiny):
    import comfy.sample
    import comfy.samplers

    patcher, world, nodes = tiny
    with torch.no_grad():  # conditioning as a Wan text encoder gives it: no layout of its own
        positive, negative = [[world.text(PROMPT), {}]], [[world.text(""), {}]]
    latent = {"samples": torch.zeros(1, 16, 3, 16, 16)}
    camera = (0.3, 0.0, 1.0, "", 0.25, 0.75, 0)
    out = nodes.CameraSampleV2.execute(patcher, positive, negative, latent, 1, 4, 3.0, "euler", "simple",
                                       *camera).result[0]["samples"]
    legacy = nodes.CameraSample.execute(patcher, positive, negative, latent, 1, 4, 3.0, "euler", "simple",
                                        *camera[:6], nodes.VIDEO_LAYOUT, 0).result[0]["samples"]
    assert torch.equal(out, legacy)
    assert torch.equal(latent["samples"], torch.zeros(1, 16, 3, 16, 16))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 4).cpu()
    noise = comfy.sample.prepare_noise(latent["samples"], 1)

    def sample_custom(sampler):
        return comfy.sample.sample_custom(patcher, noise, 3.0, sampler, sigmas, positive, negative,
                                          latent["samples"], disable_pbar=True, seed=1)
    wrapped = nodes.CameraShiftSamplerV2.execute(_euler(), *camera).result[0]
    assert torch.allclose(out, sample_custom(wrapped), atol=1e-5)
    assert not torch.allclose(out, sample_custom(_euler()), atol=1e-3)


def test_comfys_sampling_and_the_worlds_sampler_describe_each_step_alike(tiny):
    """The same schedule sampled by ComfyUI (a control driven through the pack's model wrapper) and by the world's
    sampler: the same steps with the same progress, and in each the conditional rows hold the prompt's context."""
    import comfy.patcher_extension
    from custvid_pack.nodes.comfy_sampling import drive_controls

    patcher, world, _ = tiny
    with torch.no_grad():
        positive, negative = world.text(PROMPT), world.text("")
    comfy_record, comfy_contexts = _Record(), []

    def keep_context(executor, x, t, c_concat, c_crossattn, *args, **kwargs):
        comfy_contexts.append(c_crossattn)
        return executor(x, t, c_concat, c_crossattn, *args, **kwargs)
    driven = drive_controls(patcher, [comfy_record], "test_record")
    driven.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_contexts", keep_context)
    _comfy_sample(driven, _euler(), world)
    world_record, world_contexts = _Record(), []
    forward = world.backbone.forward
    world.backbone.forward = lambda x, sigma, context: world_contexts.append(context) or forward(x, sigma, context)
    try:
        generate(world, [PROMPT], steps=6, cfg=3.0, shift=3.0, controls=[world_record], progress=lambda *_: None)
    finally:
        del world.backbone.forward
    for steps, contexts in ((comfy_record.steps, comfy_contexts), (world_record.steps, world_contexts)):
        assert len(steps) == len(contexts) >= 6
        for step, context in zip(steps, contexts):
            assert step.conditional_rows
            for row in range(context.shape[0]):
                expected = positive if row in step.conditional_rows else negative
                assert torch.allclose(context[row].float(), expected[0], atol=1e-6), (step, row)

    def described(steps):  # a host may call the model more than once per step
        return sorted({(s.index, s.count, s.progress, round(s.sigma, 5), round(s.sigma_next, 5)) for s in steps})
    assert described(comfy_record.steps) == described(world_record.steps)
    assert [s[2] for s in described(world_record.steps)] == [i / 6 for i in range(6)]


@pytest.mark.parametrize("blocks, chosen", [("all", None), ("1", {1})])
def test_box_steering_patch_equals_the_library_steering_in_the_conditional_pass_only(tiny, blocks, chosen):
    import comfy.model_management

    patcher, world, nodes = tiny
    boxes = BoxTrack.parse("0: 0, 0, 0.5, 0.5")
    steered = nodes.BoxSteeringNode.execute(patcher, boxes, PROMPT, "circle", 10.0, 0.5, blocks, "",
                                            clip=world.clip).result[0]
    assert "optimized_attention_override" not in patcher.model_options.get("transformer_options", {})
    comfy.model_management.load_models_gpu([steered])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 1, 32, 32, generator=g)
    with torch.no_grad():
        context = world.text([PROMPT, PROMPT])
    sigmas = torch.linspace(1, 0, 11)

    def comfy_call(model):
        options = {"wrappers": model.wrappers, **model.model_options["transformer_options"],
                   "cond_or_uncond": [0, 1], "sigmas": sigma, "sample_sigmas": sigmas}
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)

    steering = PromptSteering([BoxSteering(boxes, world.text.token_roles(PROMPT, "circle"), alpha=10.0, tau=0.5,
                                           blocks=None if chosen is None else frozenset(chosen))])
    grid = world.backbone.token_grid(x.shape)
    # Step 2 of 10 (boost on: a logit bias) and step 8 (boost over: the muted words dropped).
    for value in (0.8, 0.2):
        sigma = torch.tensor([value, value])
        ours, plain = comfy_call(steered), comfy_call(patcher)
        step = SamplingStep.at_sigma(value, sigmas, (0,))  # row 1 (uncond) not
        with torch.no_grad(), world.backbone.text_cross_attention(cross_attention_hook(steering, lambda: step, grid)):
            v = world.backbone.forward(x, sigma, context)
        assert torch.allclose(ours, x - value * v, atol=1e-4), value
        assert torch.allclose(ours[1], plain[1], atol=1e-5) and not torch.allclose(ours[0], plain[0], atol=1e-3)


def test_only_the_text_cross_attention_is_steered_not_an_image_to_video_models_image_tokens(tiny):
    """Wan image-to-video attends to 257 CLIP image tokens in a call of its own beside the text's: the
    override steers the call whose keys are as long as the text context, and passes the other through."""
    from comfy.ldm.modules.attention import attention_pytorch

    patcher, world, nodes = tiny
    steered = nodes.BoxSteeringNode.execute(patcher, BoxTrack.parse("0: 0, 0, 0.5, 0.5"), PROMPT, "circle", 10.0, 0.5,
                                            "all", "", clip=world.clip).result[0]
    override = steered.model_options["transformer_options"]["optimized_attention_override"]
    from custvid_pack.nodes.comfy_sampling import MODEL_CALL, ModelCall

    options = {MODEL_CALL: ModelCall(SamplingStep(0, 10, 1.0, 0.9, (0,)), (1, 4, 8), 16), "block_index": 0}
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 128, generator=g)
    for keys, is_steered in ((257, False), (16, True)):
        k = torch.randn(1, keys, 128, generator=g)
        out = override(attention_pytorch, q, k, k, 1, transformer_options=options)
        assert torch.allclose(out, attention_pytorch(q, k, k, 1), atol=1e-6) is not is_steered, keys


def test_boxes_read_from_a_mask_sequence_are_drawn_where_the_masks_are(tiny):
    _, _, nodes = tiny
    masks = torch.zeros(3, 16, 16)
    for i in range(3):
        masks[i, 4:8, 4 * i:4 * i + 4] = 1  # a square moving right
    boxes = nodes.SubjectBoxes.execute("", masks).result[0]
    assert torch.allclose(boxes.per_frame(3)[2], torch.tensor([0.5, 0.25, 0.75, 0.5]))
    drawn = nodes.DrawBoxes.execute(torch.zeros(3, 16, 16, 3), boxes).result[0]
    for i in range(3):
        lit = (drawn[i].amax(-1) > 0).nonzero()
        assert lit.amin(0).tolist() == [4, 4 * i] and lit.amax(0).tolist() == [7, 4 * i + 3]


class _Clip:  # the part of ComfyUI's CLIP object the node uses, over ComfyUI's real CLIP-L tokenizer
    def __init__(self, embedding_directory=None):
        import comfy.sd1_clip

        self.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_directory)

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)


def test_subject_words_are_found_with_comfys_own_tokenizer(tiny):
    from custvid_pack.nodes.host import token_roles

    roles = token_roles("a photo of a corgi dog on the beach", "corgi dog", _Clip(), background_words="beach")
    # CLIP-L: start token at 0, then a, photo, of, a, corgi, dog, on, the, beach.
    assert roles.subject == (5, 6) and roles.background == (9,) and roles.prompt == tuple(range(1, 10))
    with pytest.raises(ValueError, match="subject_words: 'cat' is not in the prompt"):
        token_roles("a photo of a dog", "cat", _Clip())


def test_a_placeholder_embedding_is_found_and_the_words_after_it_keep_their_place(tiny, tmp_path):
    from custvid_pack.nodes.host import token_roles
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "my_subject.safetensors"))
    clip = _Clip(str(tmp_path))
    roles = token_roles("a photo of embedding:my_subject on the beach", "embedding:my_subject", clip,
                        background_words="beach")
    # start, a, photo, of, the embedding's two vectors (4, 5), on, the, beach (8).
    assert roles.subject == (4, 5) and roles.background == (8,) and roles.prompt == tuple(range(1, 9))


@pytest.mark.parametrize("call, name", [
    (lambda n, p, w: n.CameraShiftSamplerV2.execute(None, 0.2, 0, 1, "", 0.2, 0.4, 0), "sampler"),
    (lambda n, p, w: n.CameraShiftSamplerV2.execute(_euler(), 1.5, 0, 1, "", 0.2, 0.4, 0), "pan_x"),
    (lambda n, p, w: n.CameraShiftSamplerV2.execute(_euler(), 0.2, 0, 1, "", 0.5, 0.4, 0), "window_start"),
    (lambda n, p, w: n.CameraShiftSamplerV2.execute(_euler(), 0.2, 0, 1, "1: 3, 0", 0.2, 0.4, 0), "camera_path"),
    (lambda n, p, w: n.CameraShiftSampler.execute(_euler(), 0.2, 0, 1, "", 0.2, 0.4, "world", 0), "latent_layout"),
    (lambda n, p, w: n.SubjectBoxes.execute("0: 0.5, 0.1, 0.2, 0.4"), "keyframes"),
    (lambda n, p, w: n.SubjectBoxes.execute("0: -0.1, 0.1, 0.2, 0.4"), "keyframes"),
    (lambda n, p, w: n.BoxSteeringNode.execute(p, BoxTrack.parse("0: 0,0,1,1"), PROMPT, "dog", 10, 0.3, "all", "",
                                               clip=w.clip), "subject_words"),
    (lambda n, p, w: n.BoxSteeringNode.execute(p, BoxTrack.parse("0: 0,0,1,1"), PROMPT, "circle", 10, 0.3, "all",
                                               "dog", clip=w.clip), "background_words"),
    (lambda n, p, w: n.BoxSteeringNode.execute(p, BoxTrack.parse("0: 0,0,1,1"), PROMPT, "circle", 10, 0.3, "x", "",
                                               world_text=w.clip), "blocks"),
    (lambda n, p, w: n.BoxSteeringNode.execute(p, BoxTrack.parse("0: 0,0,1,1"), PROMPT, "circle", 10, 0.3, "all", ""),
     "clip"),
])
def test_bad_control_input_names_the_input(tiny, call, name):
    patcher, world, nodes = tiny
    with pytest.raises(ValueError) as e:
        call(nodes, patcher, world)
    assert str(e.value).startswith(name + ":")


def _euler():
    import comfy.samplers

    return comfy.samplers.sampler_object("euler")


def test_the_worlds_clip_encodes_and_finds_words_as_its_text_encoder_does(tiny):
    """ComfyUI's CLIP around the world's text encoder: CLIPTextEncode's calls give the encoder's own context, a
    clone encodes the same, and `token_roles` through `clip.tokenize` finds the positions the encoder finds."""
    from custvid_pack.nodes.host import token_roles

    _, world, _ = tiny
    ((context, extras),) = encode(world.clip, PROMPT)
    with torch.no_grad():
        assert torch.equal(context, world.text(PROMPT))
        assert torch.equal(encode(world.clip.clone(), "")[0][0], world.text(""))
    assert extras["pooled_output"] is None  # as umt5 gives Wan
    roles = token_roles(PROMPT, "striped circle", world.clip, background_words="red")
    expected = world.text.token_roles(PROMPT, "striped circle", "red")  # (another import of custvid_core's class)
    assert (roles.subject, roles.prompt, roles.background) == (expected.subject, expected.prompt, expected.background)
    with pytest.raises(ValueError, match="^prompt: 'dog' is not a word of the shapes world"):
        world.clip.tokenize("a dog")

"""Tiny real architectures with random weights and synthetic clips (nothing is downloaded)."""

import torch

# 64-dim heads like every published DINOv2, so a config read off weight shapes matches.
TINY_DINO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=56, patch_size=14,
                 mlp_ratio=2)


def moving_square_clip(frames=4, size=(40, 56), step=(3, 1), side=10):
    """A white square moving `step` (x, y) pixels per frame over a striped background, with its masks."""
    h, w = size
    clip = torch.zeros(frames, h, w, 3)
    clip[..., 2] = (torch.arange(w) % 8 < 4).float() * 0.5
    masks = torch.zeros(frames, h, w)
    for f in range(frames):
        x, y = 5 + step[0] * f, 5 + step[1] * f
        clip[f, y:y + side, x:x + side] = 1.0
        masks[f, y:y + side, x:x + side] = 1.0
    return clip, masks


def tiny_diffusers_wan(layers=2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=16, out_channels=16, text_dim=64, freq_dim=32, ffn_dim=64,
                                 num_layers=layers).eval()


def residual_effect(backbone, block: int, site: str, x, sigma, context, stream_input: str, chunks):
    """Run `backbone` with a residual `f(h) = h @ W` beside `site` of `block` and without it; return (how the
    residual stream changed, gate * f(h) computed by hand). The stream is read after the sublayer's gated
    add: at the input of the block's module `stream_input` for the self-attention, at the block's output for
    the FFN. `chunks(block_module, args, kwargs)` gives the block's six modulation chunks from its inputs."""
    module = backbone.blocks[block]
    weight = torch.randn(backbone.dim, backbone.dim, generator=torch.Generator().manual_seed(1)) * 0.1
    seen = {}

    def residual(h):
        seen["h"] = h
        return h @ weight

    def run():
        hooks = [module.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("chunks", chunks(m, a, k)),
                                                  with_kwargs=True)]
        if site == "ffn":
            hooks.append(module.register_forward_hook(lambda m, a, out: seen.__setitem__("stream", out)))
        else:
            hooks.append(module.get_submodule(stream_input).register_forward_pre_hook(
                lambda m, a: seen.__setitem__("stream", a[0])))
        with torch.no_grad():
            backbone.forward(x, sigma, context)
        for h in hooks:
            h.remove()
        return seen["stream"]

    plain = run()
    handle = backbone.add_residual(block, site, residual)
    added = run()
    handle.remove()
    gate = seen["chunks"][2 if site == "self_attn" else 5]
    return added - plain, gate * (seen["h"] @ weight)


def tiny_clip_folder(folder, image_size=32):
    """A tiny random transformers CLIP saved with a tokenizer of letters (what `load_clip` reads)."""
    import json
    from pathlib import Path

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder

"""Stage 0: the components of a model folder."""

from __future__ import annotations

import torch

from vsstreamdiffvsr.pipeline.components import split_cond_embedding


def test_controlnet_with_its_embedding_split_off_is_the_same_function(tiny_ckpt) -> None:
    """The pipeline embeds ARTG's condition once per frame; ControlNet(embedding(c)) must equal the original."""
    import copy

    from vsstreamdiffvsr import weights

    whole = weights.load_controlnet(tiny_ckpt, torch.float32)
    split = copy.deepcopy(whole)
    embedding = split_cond_embedding(split)
    assert embedding is not None and isinstance(split.controlnet_cond_embedding, torch.nn.Identity)
    assert split_cond_embedding(split) is None  # already split: left alone
    g = torch.Generator().manual_seed(7)
    inp, cond = torch.randn(1, 7, 16, 20, generator=g), torch.rand(1, 3, 64, 80, generator=g) * 2 - 1
    emb = torch.randn(1, 77, whole.config.cross_attention_dim, generator=g)
    t = torch.tensor(749)
    with torch.no_grad():
        ref = whole(inp, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        got = split(inp, t, encoder_hidden_states=emb, controlnet_cond=embedding(cond), return_dict=False)
    for a, b in zip([*ref[0], ref[1]], [*got[0], got[1]]):
        assert torch.equal(a, b)
    bgr = copy.deepcopy(whole)
    bgr.register_to_config(controlnet_conditioning_channel_order="bgr")
    assert split_cond_embedding(bgr) is None and not isinstance(bgr.controlnet_cond_embedding, torch.nn.Identity)

"""Unit tests of the model pieces: warp, bicubic x4, TPM block, temporal tiny VAE, DDIM scheduler.

Expected values come from direct, independent computations written here (numpy / plain loops),
following docs section 2.4-2.6 of the upstream reference, not from the package's own output.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsstreamdiffvsr.models.flow import bicubic_x4, warp
from vsstreamdiffvsr.models.temporal_vae import TemporalTinyBlock, TemporalTinyVAE, VAEConfigError
from vsstreamdiffvsr.testing import TINY_VAE, randomize_


# ------------------------------------------------------------------------------------------------ warp

def _bilinear_zero_pad(img: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample ``img`` (C,H,W) at pixel coordinates (sx, sy) (H',W'), bilinear, zeros outside."""
    c, h, w = img.shape
    out = np.zeros((c,) + sx.shape, dtype=np.float64)
    for i in range(sx.shape[0]):
        for j in range(sx.shape[1]):
            x, y = sx[i, j], sy[i, j]
            x0, y0 = math.floor(x), math.floor(y)
            fx, fy = x - x0, y - y0
            acc = np.zeros(c)
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    if 0 <= yy < h and 0 <= xx < w:
                        acc += wy * wx * img[:, yy, xx]
            out[:, i, j] = acc
    return out


def _reference_warp(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Docs 2.6: pixel p is sampled at (p + flow) * S / (S - 1) - 0.5 along each axis."""
    _, h, w = img.shape
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    sx = (gx + flow[0]) * w / max(w - 1, 1) - 0.5
    sy = (gy + flow[1]) * h / max(h - 1, 1) - 0.5
    return _bilinear_zero_pad(img, sx, sy)


def test_warp_zero_flow_reproduces_reference_ramp() -> None:
    h, w = 5, 16
    ramp = torch.arange(w, dtype=torch.float32).expand(1, 1, h, w).contiguous()
    out = warp(ramp, torch.zeros(1, 2, h, w))
    # Independent: pixel x sampled at x*W/(W-1) - 0.5, bilinear, zero padding.
    row = []
    for x in range(w):
        s = x * w / (w - 1) - 0.5
        x0 = math.floor(s)
        f = s - x0
        v0 = float(x0) if 0 <= x0 < w else 0.0
        v1 = float(x0 + 1) if 0 <= x0 + 1 < w else 0.0
        row.append((1 - f) * v0 + f * v1)
    mid = out[0, 0, h // 2]  # the centre row of an odd height is sampled exactly at its own y
    torch.testing.assert_close(mid, torch.tensor(row, dtype=torch.float32), atol=1e-5, rtol=0)
    # The documented values from the reference run.
    doc = torch.tensor([0.0, 0.567, 1.633], dtype=torch.float32)
    torch.testing.assert_close(mid[:3], doc, atol=1e-3, rtol=0)
    assert abs(float(mid[-2]) - 14.433) < 1e-3
    assert abs(float(mid[-1]) - 7.5) < 1e-5
    # Zero flow is not the identity.
    assert not torch.allclose(mid, ramp[0, 0, 0])
    # Whole image (border rows blend with zero) equals the independent sampler.
    exp = _reference_warp(ramp[0].double().numpy(), np.zeros((2, h, w)))
    np.testing.assert_allclose(out[0].double().numpy(), exp, atol=1e-5)
    assert float(out[0, 0, 0, 8]) < float(mid[8]) - 1.0  # first row is half blended with zeros


def test_warp_random_flow_matches_independent_sampler() -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 2, 7, 9, generator=g)
    flow = torch.randn(1, 2, 7, 9, generator=g) * 2.5
    out = warp(img, flow)
    exp = _reference_warp(img[0].double().numpy(), flow[0].double().numpy())
    np.testing.assert_allclose(out[0].double().numpy(), exp, atol=1e-5)


def test_warp_of_a_half_precision_frame_samples_where_float32_does() -> None:
    """Positions are computed in float32: in float16 a 1920-px-wide grid is off by up to 1.4 px."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 4, 1920, generator=g)
    flow = torch.full((1, 2, 4, 1920), 0.3)
    ref = warp(x, flow)
    half = warp(x.half(), flow)
    assert half.dtype == torch.float16
    assert float((half.float() - ref).abs().max()) <= 1e-3  # the output's own rounding only


def test_warp_constant_integer_flow_is_a_shift() -> None:
    g = torch.Generator().manual_seed(2)
    h, w = 12, 14
    img = torch.randn(1, 3, h, w, generator=g)
    u, v = 3, -2
    flow = torch.empty(1, 2, h, w)
    flow[:, 0] = u
    flow[:, 1] = v
    shifted = warp(img, flow)
    base = warp(img, torch.zeros(1, 2, h, w))
    # Interior: pixel (y, x) with flow (u, v) reads where zero flow reads for pixel (y+v, x+u).
    ys = slice(max(0, -v), h - max(0, v))
    xs = slice(max(0, -u), w - max(0, u))
    ys_src = slice(ys.start + v, ys.stop + v)
    xs_src = slice(xs.start + u, xs.stop + u)
    torch.testing.assert_close(shifted[..., ys, xs], base[..., ys_src, xs_src], atol=1e-6, rtol=0)
    # And it really moved the content.
    assert not torch.allclose(shifted, base)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 2, 8, 9), (1, 2, 9, 8), (2, 8, 8), (1, 1, 2, 8, 8)])
def test_warp_rejects_wrong_flow_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="flow"):
        warp(torch.zeros(1, 3, 8, 8), torch.zeros(shape))


# ------------------------------------------------------------------------------------------ bicubic x4

def test_raft_flow_is_torchvisions_last_estimate_bit_for_bit() -> None:
    """Our RAFT loop (one final upsampling, device-side grid) returns exactly torchvision's flow[-1]."""
    from torchvision.models.optical_flow import raft_large

    from vsstreamdiffvsr.models.flow import RaftFlow

    torch.manual_seed(0)
    raft = raft_large(weights=None).eval()
    for m in raft.modules():  # fresh RAFT heads are near zero: make every update move the flow
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.05)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 128, 136, generator=g) * 2 - 1
    b = torch.roll(a, (3, -2), (2, 3)) + 0.05 * torch.randn(1, 3, 128, 136, generator=g)
    with torch.inference_mode():
        want = raft(a, b, num_flow_updates=12)
        got = RaftFlow(raft).forward(a, b)
    assert float((want[-1] - want[-2]).abs().max()) > 1e-4  # the updates matter: this compares the last one
    assert torch.equal(got, want[-1])
    c = torch.roll(b, (1, 2), (2, 3))  # the next pair (c, b) with b's feature map kept from the pair (b, a)
    with torch.inference_mode():
        _, features_b = RaftFlow(raft).flow_and_features(b, a)
        kept, _ = RaftFlow(raft).flow_and_features(c, b, previous_features=features_b)
        assert torch.equal(kept, RaftFlow(raft).forward(c, b))
        # with b's feature map kept, b itself is not needed (the pipeline then skips its bicubic x4)
        assert torch.equal(RaftFlow(raft).flow_and_features(c, None, previous_features=features_b)[0], kept)
        with pytest.raises(ValueError, match="previous frame or its feature map"):
            RaftFlow(raft).flow_and_features(c, None)
        with pytest.raises(ValueError, match="do not fit"):
            RaftFlow(raft).flow_and_features(c, b, previous_features=features_b[..., :8])
    with pytest.raises(ValueError, match="divisible by 8"):
        RaftFlow(raft).forward(a[..., :124], b[..., :124])


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_1d_x4(v: np.ndarray) -> np.ndarray:
    """PyTorch's cubic (a=-0.75), align_corners=False, border indices clamped."""
    n = len(v)
    out = np.zeros(4 * n)
    for i in range(4 * n):
        s = (i + 0.5) / 4 - 0.5
        i0 = math.floor(s)
        t = s - i0
        acc = 0.0
        for k in range(-1, 3):
            idx = min(max(i0 + k, 0), n - 1)
            acc += v[idx] * _cubic(k - t)
        out[i] = acc
    return out


def test_bicubic_x4_matches_torch_and_independent_kernel() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 9, 11, generator=g) * 2 - 1
    y = bicubic_x4(x)
    assert y.shape == (1, 3, 36, 44)
    torch.testing.assert_close(y, F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False),
                               atol=0, rtol=0)
    # A step edge varying only along W: rows are constant, so the 2-D result is the 1-D kernel's.
    step = torch.tensor([-1.0] * 5 + [1.0] * 5)
    img = step.expand(1, 1, 6, 10).contiguous()
    out = bicubic_x4(img)
    exp = _bicubic_1d_x4(step.double().numpy())
    np.testing.assert_allclose(out[0, 0, 10].double().numpy(), exp, atol=1e-5)
    # Unclamped: overshoot on both sides of the step.
    assert float(out.min()) < -1.05 and float(out.max()) > 1.05
    assert float(exp.min()) < -1.05  # the independent kernel agrees that it overshoots


# ------------------------------------------------------------------------------------------- TPM block

def _bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """(out, in) matrix of bilinear resize with align_corners=False (PyTorch's convention)."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    scale = in_size / out_size
    for i in range(out_size):
        s = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(s)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = s - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def _reference_block(block: TemporalTinyBlock, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """Docs 2.4, written out directly (float64)."""
    x = x.double()
    convs = [block.conv[0], block.conv[2], block.conv[4]]
    c = x
    for k, conv in enumerate(convs):
        c = F.conv2d(c, conv.weight.double(), conv.bias.double(), padding=1)
        if k < 2:
            c = torch.relu(c)
    if prev is not None:
        prev = prev.double()
        b, ch, h, w = c.shape
        ph, pw = h // 4, w // 4  # floor

        def pool(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, :ph * 4, :pw * 4].reshape(b, ch, ph, 4, pw, 4).mean(dim=(3, 5))

        hw = ph * pw
        seq = torch.cat([pool(c).reshape(b, ch, hw), pool(prev).reshape(b, ch, hw)], dim=2)
        tp0, tp2 = block.temporal_processor[0], block.temporal_processor[2]
        o = F.conv1d(seq, tp0.weight.double(), tp0.bias.double(), padding=1)
        o = F.conv1d(torch.relu(o), tp2.weight.double(), tp2.bias.double(), padding=1)
        a = float(block.alpha.detach())
        fuse = (a * o[:, :, :hw] + (1 - a) * o[:, :, hw:]).reshape(b, ch, ph, pw)
        up = _bilinear_matrix(h, ph) @ fuse @ _bilinear_matrix(w, pw).T
        c = c + 0.1 * up
    return torch.relu(c + x)


@pytest.fixture
def block() -> TemporalTinyBlock:
    torch.manual_seed(4)
    blk = TemporalTinyBlock(8, "relu")
    randomize_(blk, seed=5)
    with torch.no_grad():
        blk.alpha.fill_(float(torch.rand(())) * 0.6 + 0.2)
    return blk.eval()


def test_tpm_block_matches_independent_formula(block: TemporalTinyBlock) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 8, 18, 22, generator=g)
    prev = torch.rand(1, 8, 18, 22, generator=g) * 3
    with torch.no_grad():
        out = block(x, prev)
    ref = _reference_block(block, x, prev)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_tpm_block_without_prev_is_relu_conv_plus_x(block: TemporalTinyBlock) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 8, 18, 22, generator=g)
    with torch.no_grad():
        out = block(x)
        direct = torch.relu(block.conv(x) + x)
    torch.testing.assert_close(out, direct, atol=0, rtol=0)
    torch.testing.assert_close(out.double(), _reference_block(block, x, None), atol=1e-5, rtol=1e-5)
    prev = torch.rand(1, 8, 18, 22, generator=g) * 3
    with torch.no_grad():
        with_prev = block(x, prev)
    assert float((with_prev - out).abs().max()) > 1e-3


def test_tpm_alpha_weights_current_and_previous_halves(block: TemporalTinyBlock) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 8, 16, 16, generator=g)
    prev = torch.rand(1, 8, 16, 16, generator=g) * 3
    outs = []
    for a in (0.0, 1.0, 0.3):
        with torch.no_grad():
            block.alpha.fill_(a)
            outs.append(block(x, prev))
        torch.testing.assert_close(outs[-1].double(), _reference_block(block, x, prev), atol=1e-5, rtol=1e-5)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-4


# ----------------------------------------------------------------------------------------- tiny VAE

@pytest.fixture(scope="module")
def tiny_vae() -> TemporalTinyVAE:
    torch.manual_seed(9)
    vae = TemporalTinyVAE.from_config(TINY_VAE)
    randomize_(vae, seed=10)
    return vae.eval()


def _manual_encoder_features(vae: TemporalTinyVAE, x: torch.Tensor) -> list[torch.Tensor]:
    feats = []
    for layer in list(vae.encoder.layers)[:-1]:  # the final latent conv is not a feature
        x = layer(x)
        if isinstance(layer, TemporalTinyBlock):
            feats.append(x)
    return feats[::-1]


def test_temporal_features_deepest_first_on_raw_input(tiny_vae: TemporalTinyVAE) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.rand(1, 3, 16, 20, generator=g) * 2 - 1
    with torch.no_grad():
        feats = tiny_vae.temporal_features(x)
        manual = _manual_encoder_features(tiny_vae, x)
        shifted = _manual_encoder_features(tiny_vae, (x + 1) / 2)
    n_dec_blocks = sum(isinstance(m, TemporalTinyBlock) for m in tiny_vae.decoder.layers)
    assert n_dec_blocks == 7
    assert len(feats) == n_dec_blocks
    assert [tuple(f.shape[-2:]) for f in feats] == [(4, 5)] * 3 + [(8, 10)] * 3 + [(16, 20)]
    for f, m in zip(feats, manual):
        torch.testing.assert_close(f, m, atol=0, rtol=0)
    # No [-1,1] -> [0,1] shift: the shifted input gives different features.
    assert float((feats[0] - shifted[0]).abs().max()) > 1e-3
    assert all(float(f.min()) >= 0 for f in feats)  # post-ReLU block outputs


def _manual_decode(vae: TemporalTinyVAE, z: torch.Tensor, feats: list[torch.Tensor] | None) -> torch.Tensor:
    x = torch.tanh(z / 3) * 3
    k = 0
    for layer in vae.decoder.layers:
        if isinstance(layer, TemporalTinyBlock):
            x = layer(x, None if feats is None else feats[k])
            k += 1
        else:
            x = layer(x)
    return x * 2 - 1


def test_decode_tanh_first_and_affine_last(tiny_vae: TemporalTinyVAE) -> None:
    g = torch.Generator().manual_seed(12)
    z = torch.randn(1, 4, 5, 6, generator=g) * 4  # large enough for tanh(z/3)*3 to matter
    warped = torch.rand(1, 3, 20, 24, generator=g) * 2 - 1
    with torch.no_grad():
        plain = tiny_vae.decode(z)
        feats = tiny_vae.temporal_features(warped)
        fused = tiny_vae.decode(z, feats)
        m_plain = _manual_decode(tiny_vae, z, None)
        m_fused = _manual_decode(tiny_vae, z, feats)
        no_tanh = _manual_decode(tiny_vae, torch.atanh(torch.clamp(z / 3, -0.999, 0.999)) * 3, None)
    assert plain.shape == (1, 3, 20, 24)
    torch.testing.assert_close(plain, m_plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused, m_fused, atol=1e-6, rtol=1e-6)
    assert float((fused - plain).abs().max()) > 1e-4  # TPM active in the decoder
    assert float((no_tanh - plain).abs().max()) > 1e-3  # the tanh squashing is really applied
    # Layer-by-layer check of the affine tail: the pre-affine output p gives 2p-1.
    with torch.no_grad():
        x = torch.tanh(z / 3) * 3
        for layer in tiny_vae.decoder.layers:
            x = layer(x)
    torch.testing.assert_close(plain, 2 * x - 1, atol=1e-6, rtol=1e-6)


def test_decode_rejects_wrong_feature_count(tiny_vae: TemporalTinyVAE) -> None:
    z = torch.zeros(1, 4, 4, 4)
    with torch.no_grad():
        feats = tiny_vae.temporal_features(torch.zeros(1, 3, 16, 16))
        with pytest.raises(ValueError):
            tiny_vae.decode(z, feats[:-1])


@pytest.mark.parametrize("override", [
    {"encoder_block_out_channels": [64, 32, 64]},
    {"decoder_block_out_channels": [64, 64, 32]},
    {"num_decoder_blocks": [3, 3, 3]},
    {"num_encoder_blocks": [3, 3, 1]},
    {"num_encoder_blocks": [1, 3], "encoder_block_out_channels": [64, 64]},
    {"act_fn": "nonsense"},
])
def test_from_config_rejects_unbuildable(override: dict) -> None:
    cfg = {**TINY_VAE, "encoder_block_out_channels": [64, 64, 64], "decoder_block_out_channels": [64, 64, 64],
           **override}
    with torch.device("meta"):
        with pytest.raises(VAEConfigError):
            TemporalTinyVAE.from_config(cfg)


def _expected_vae_keys() -> dict[str, tuple[int, ...]]:
    """Checkpoint naming and shapes from docs section 2.4 / 3 for the default (64 ch, [1,3,3]/[3,3,1])."""
    c = 64
    keys: dict[str, tuple[int, ...]] = {}

    def blk(prefix: str) -> None:
        keys[f"{prefix}.alpha"] = ()
        for j in (0, 2, 4):
            keys[f"{prefix}.conv.{j}.weight"] = (c, c, 3, 3)
            keys[f"{prefix}.conv.{j}.bias"] = (c,)
        for j in (0, 2):
            keys[f"{prefix}.temporal_processor.{j}.weight"] = (c, c, 3)
            keys[f"{prefix}.temporal_processor.{j}.bias"] = (c,)

    keys["encoder.layers.0.weight"] = (c, 3, 3, 3)
    keys["encoder.layers.0.bias"] = (c,)
    keys["encoder.layers.2.weight"] = (c, c, 3, 3)
    keys["encoder.layers.6.weight"] = (c, c, 3, 3)
    keys["encoder.layers.10.weight"] = (4, c, 3, 3)
    keys["encoder.layers.10.bias"] = (4,)
    for i in (1, 3, 4, 5, 7, 8, 9):
        blk(f"encoder.layers.{i}")
    keys["decoder.layers.0.weight"] = (c, 4, 3, 3)
    keys["decoder.layers.0.bias"] = (c,)
    keys["decoder.layers.6.weight"] = (c, c, 3, 3)
    keys["decoder.layers.11.weight"] = (c, c, 3, 3)
    keys["decoder.layers.13.weight"] = (3, c, 3, 3)
    keys["decoder.layers.13.bias"] = (3,)
    for i in (2, 3, 4, 7, 8, 9, 12):
        blk(f"decoder.layers.{i}")
    return keys


def test_default_vae_state_dict_matches_checkpoint_naming() -> None:
    with torch.device("meta"):
        vae = TemporalTinyVAE()
    sd = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = _expected_vae_keys()
    assert sd == expected
    assert len(sd) == 166  # docs: the VAE file has 166 tensors
    assert "decoder.layers.6.bias" not in sd and "decoder.layers.11.bias" not in sd
    enc = sum(v.numel() for k, v in vae.state_dict().items() if k.startswith("encoder."))
    dec = sum(v.numel() for k, v in vae.state_dict().items() if k.startswith("decoder."))
    assert (enc, dec) == (1_026_251, 1_026_250)  # docs: parameter counts of the published VAE
    assert vae.scale == 4


def test_from_config_ignores_unknown_keys_and_builds_tiny() -> None:
    with torch.device("meta"):
        vae = TemporalTinyVAE.from_config({**TINY_VAE, "some_future_key": 1})
    assert vae.scale == 4 and vae.scaling_factor == 1.0
    assert vae.state_dict()["decoder.layers.13.weight"].shape == (3, 16, 3, 3)


# ----------------------------------------------------------------------------------------- scheduler

def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(math.sqrt(1e-4), math.sqrt(0.02), 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def test_scheduler_timesteps_and_prediction_type(tiny_ckpt: Path) -> None:
    from vsstreamdiffvsr import weights

    sched = weights.load_scheduler(tiny_ckpt)
    sched.set_timesteps(4)
    assert [int(t) for t in sched.timesteps] == [999, 749, 499, 249]
    assert sched.config.prediction_type == "v_prediction"
    torch.testing.assert_close(sched.alphas_cumprod.float(), _alphas_cumprod(), atol=1e-7, rtol=1e-6)


def test_scheduler_step_matches_v_prediction_formula(tiny_ckpt: Path) -> None:
    from vsstreamdiffvsr import weights

    sched = weights.load_scheduler(tiny_ckpt)
    sched.set_timesteps(4)
    a = _alphas_cumprod().double()
    g = torch.Generator().manual_seed(13)
    prev_of = {999: 749, 749: 499, 499: 249, 249: None}
    for t in (999, 749, 499, 249):
        z = torch.randn(1, 4, 6, 5, generator=g)
        v = torch.randn(1, 4, 6, 5, generator=g)
        out = sched.step(v, t, z, eta=0.0).prev_sample
        at = a[t]
        ap = a[0] if prev_of[t] is None else a[prev_of[t]]  # final alpha is alphas_cumprod[0], not 1
        zd, vd = z.double(), v.double()
        x0 = at.sqrt() * zd - (1 - at).sqrt() * vd
        eps = at.sqrt() * vd + (1 - at).sqrt() * zd
        exp = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
        torch.testing.assert_close(out.double(), exp, atol=2e-6, rtol=2e-6)
        if t == 249:
            # With a_prev = 1 the result would be x0 exactly; it must not be.
            assert float((out.double() - x0).abs().max()) > 1e-3
            assert float(ap) < 1.0


def test_half_precision_raft_keeps_correlation_and_coordinates_in_float32() -> None:
    """raft_dtype follows RAFT's own mixed-precision recipe: the networks in half precision; the correlation
    pyramid, its lookups, the flow coordinates and the x8 upsampling in float32. The flow stays close to the
    float32 one (on random weights: no promise for trained ones) and comes back in float32."""
    from torchvision.models.optical_flow import raft_large

    from vsstreamdiffvsr.models.flow import RaftFlow

    torch.manual_seed(0)
    raft = raft_large(weights=None).eval()
    for m in raft.modules():  # as above: make every update move the flow
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.05)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 128, 136, generator=g) * 2 - 1
    b = torch.roll(a, (3, -2), (2, 3)) + 0.05 * torch.randn(1, 3, 128, 136, generator=g)
    ref = RaftFlow(raft)
    assert ref.with_dtype(torch.float32) is ref
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ref.with_dtype(torch.float64)
    with torch.inference_mode():
        want = ref.forward(a, b)
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        half = ref.with_dtype(dtype)
        assert next(half.raft.parameters()).dtype == dtype
        assert next(raft.parameters()).dtype == torch.float32  # a copy: the float32 RAFT is untouched
        seen: list[tuple[torch.dtype, ...]] = []
        for corr in ("full", "half"):
            block = half._blocks[corr]
            real_build, real_index = block.build_pyramid, block.index_pyramid
            block.build_pyramid = lambda f1, f2, real=real_build: (seen.append(("build", f1.dtype)), real(f1, f2))[1]
            block.index_pyramid = lambda centroids_coords, real=real_index: (
                seen.append(("index", centroids_coords.dtype)), real(centroids_coords))[1]
        with torch.inference_mode():
            got, features = half.flow_and_features(a, b)
            if dtype == torch.bfloat16:  # (CPU float16 convolutions are slow: one flow in float16)
                got_half, _ = half.flow_and_features(a, b, corr="half")
                assert ("build", dtype) in seen  # the float16 pyramid rounds the maps itself
                assert float((got_half - got).abs().max()) <= 0.05
        assert got.dtype == torch.float32 and features.dtype == dtype
        # torchvision's pyramid gets float32 maps, and every lookup is at float32 coordinates
        assert ("build", torch.float32) in seen
        assert {d for what, d in seen if what == "index"} == {torch.float32}
        errors[dtype] = float((got - want).abs().max())
    assert 0.0 < errors[torch.float16] <= 0.03 and errors[torch.float16] < errors[torch.bfloat16] <= 0.3, errors

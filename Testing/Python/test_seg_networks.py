"""Segmenter networks: shapes, parameter counts, attention scaling, argument checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from CovidGANSegLib.seg.transunet import SEG_CONFIGS, MultiHeadSelfAttention, SegConfig, TransUNet, count_parameters, get_seg_config
from CovidGANSegLib.seg.unet import UNet2D, build_segmenter

TINY = SEG_CONFIGS["tiny"]


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_tiny_shapes_and_projection(arch):
    torch.manual_seed(0)
    model = build_segmenter(arch, TINY).eval()
    x = torch.rand(3, 1, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 1, 32, 32)
    z = model.project(x)
    assert z.shape == (3, TINY.projection_dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    logits2, z2 = model.forward_with_projection(x)
    assert torch.allclose(logits, logits2, atol=1e-6) and torch.allclose(z, z2, atol=1e-6)


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_any_size_divisible_by_16(arch):
    model = build_segmenter(arch, TINY).eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 1, 48, 64)).shape == (2, 1, 48, 64)


def test_small_shapes_default_128():
    model = TransUNet(SEG_CONFIGS["small"]).eval()
    with torch.inference_mode():
        assert model(torch.rand(1, 1, 128, 128)).shape == (1, 1, 128, 128)
    n = count_parameters(model)
    assert 0.5e6 < n < 5e6, n
    assert count_parameters(UNet2D(SEG_CONFIGS["small"])) < 5e6


def test_paper_parameter_count_about_67M():
    with torch.device("meta"):  # no memory, no forward
        model = TransUNet(SEG_CONFIGS["paper"])
    n = count_parameters(model)
    assert 66e6 < n < 68.5e6, n
    c = SEG_CONFIGS["paper"]
    assert (c.num_heads, c.mlp_dim, c.num_layers, c.learning_rate) == (4, 512, 8, 5e-5)


def test_attention_is_softmax_qk_over_sqrt_d_times_v():
    torch.manual_seed(1)
    hidden, heads = 12, 3
    attn = MultiHeadSelfAttention(hidden, heads).eval()
    x = torch.randn(2, 5, hidden)
    d = hidden // heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (2, 5, 36)
    q, k, v = qkv[..., :hidden], qkv[..., hidden:2 * hidden], qkv[..., 2 * hidden:]
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(w @ vh)
    expected = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x), expected, atol=1e-5)
    # and NOT the seed's sqrt(d) multiplication
    wrong = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        wrong.append(torch.softmax(qh @ kh.transpose(1, 2) * math.sqrt(d), dim=-1) @ vh)
    assert not torch.allclose(attn(x), torch.cat(wrong, dim=-1) @ attn.proj.weight.T + attn.proj.bias, atol=1e-3)


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_bad_inputs_raise_value_error(arch):
    model = build_segmenter(arch, TINY)
    with pytest.raises(ValueError, match="channel"):
        model(torch.rand(1, 2, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.rand(1, 32, 32))


def test_config_checks_and_json(tmp_path):
    with pytest.raises(ValueError):
        SegConfig(hidden_size=10, num_heads=4)
    with pytest.raises(ValueError):
        SegConfig(image_size=100)
    with pytest.raises(ValueError):
        SegConfig(fn_mode="fuzzy")
    with pytest.raises(ValueError):
        build_segmenter("resnet", TINY)
    with pytest.raises(ValueError):
        get_seg_config("huge")
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"base": "tiny", "beta": 3.0}))
    c = get_seg_config(p)
    assert c.beta == 3.0 and c.hidden_size == TINY.hidden_size and c.name == "mine"
    assert SegConfig.from_dict(c.to_dict()) == c


def test_encoder_parameters_exclude_decoder():
    model = TransUNet(TINY)
    enc = {id(p) for p in model.encoder_parameters()}
    assert all(id(p) not in enc for p in model.decoder.parameters())
    assert id(model.pos_embed) in enc
    assert all(id(p) in enc for p in model.projection.parameters())


# ---- stride-2 stem (issue 8, "Speed of the paper TransUNet") ---------------------------------
TINY_S2 = TINY.replace(stem_stride=2)


def _stem_conv(model: TransUNet) -> torch.nn.Conv2d:
    return next(m for m in model.encoder.stages[0].modules() if isinstance(m, torch.nn.Conv2d))


def test_paper_encoder_has_one_narrow_full_resolution_block_and_small_is_unchanged():
    """``paper``: a 32-wide residual stem at 1/1 feeds the encoder; its first stride-2 block makes 1/2."""
    c = SEG_CONFIGS["paper"]
    assert c.stem_stride == 1 and c.full_res_channels == 0
    with torch.device("meta"):
        paper = TransUNet(c)
        small = TransUNet(SEG_CONFIGS["small"])
        full_res = []
        hooks = [m.register_forward_hook(lambda m, _i, out: full_res.append(m.out_channels) if out.shape[-1] == 128 else None)
                 for m in paper.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
        assert paper(torch.empty(2, 1, 128, 128)).shape == (2, 1, 128, 128)
    for h in hooks:
        h.remove()
    assert full_res == [32, 32, 32]  # the stem block's two 3 x 3 convolutions and its 1 x 1 shortcut: nothing wider
    assert paper.encoder.stages[1][0].conv1.stride == (2, 2)
    assert paper.encoder.skip_channels == [32, 64, 128, 256]
    assert paper.decoder[-1].conv1[0].in_channels == c.decoder_channels[-2] + 32
    # small is unchanged (its speed and its checkpoints)
    assert SEG_CONFIGS["small"].stem_stride == 1 and _stem_conv(small).stride == (1, 1)
    assert len(small.encoder.skip_channels) == 4
    # the stride-2 stem stays available as an option
    conv = _stem_conv(TransUNet(TINY_S2))
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_stride2_stem_shapes_skips_and_projection(size):
    torch.manual_seed(0)
    model = TransUNet(TINY_S2).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        feat, skips = model.encoder(x)
        assert [tuple(s.shape[2:]) for s in skips] == [(size[0] // f, size[1] // f) for f in (1, 2, 4, 8)]
        assert [s.shape[1] for s in skips] == [1, *TINY_S2.encoder_channels[1:4]]
        assert skips[0] is x  # the 1/1 skip is the input: no full-resolution feature map in the encoder
        assert tuple(feat.shape) == (2, TINY_S2.encoder_channels[-1], size[0] // 16, size[1] // 16)
        logits = model(x)
        logits2, z = model.forward_with_projection(x)
    assert logits.shape == (2, 1, *size)
    assert torch.allclose(logits, logits2, atol=1e-6)
    assert z.shape == (2, TINY_S2.projection_dim) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_stride2_stem_trains_and_no_full_resolution_encoder_map():
    torch.manual_seed(0)
    model = TransUNet(TINY_S2)
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[2:]))) for m in model.encoder.modules()
             if isinstance(m, torch.nn.Conv2d)]
    x = torch.rand(3, 1, 32, 32)
    loss = model(x).square().mean() + model.project(x).sum()
    loss.backward()
    for h in hooks:
        h.remove()
    assert seen and max(s[0] for s in seen) == 16  # nothing in the encoder at 32 x 32
    assert all(p.grad is not None for p in model.parameters() if p is not model.pos_embed) and model.pos_embed.grad is not None


def test_paper_forward_full_resolution_logits():
    torch.manual_seed(0)
    model = TransUNet(SEG_CONFIGS["paper"]).eval()
    with torch.inference_mode():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_full_resolution_block_is_the_1_1_skip():
    torch.manual_seed(0)
    cfg = TINY_S2.replace(full_res_channels=4)
    model = TransUNet(cfg).eval()
    assert model.encoder.skip_channels == [4, *cfg.encoder_channels[1:4]]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        _, skips = model.encoder(x)
        assert tuple(skips[0].shape) == (2, 4, 32, 32)
        assert model(x).shape == (2, 1, 32, 32)
    assert model.decoder[-1].conv1[0].in_channels == cfg.decoder_channels[-2] + 4


def test_stem_stride_checks():
    with pytest.raises(ValueError, match="stem_stride"):
        SegConfig(stem_stride=4)
    with pytest.raises(ValueError, match="full_res_channels"):
        SegConfig(full_res_channels=8)  # needs the stride-2 stem
    with pytest.raises(ValueError, match="encoder_blocks"):
        SegConfig(stem_stride=2, encoder_blocks=(2, 1, 1, 1, 1))
    assert SegConfig.from_dict(TINY_S2.to_dict()) == TINY_S2


def test_checkpoints_from_before_stem_stride_load_and_new_ones_refuse_old_weights(tmp_path):
    """A configuration saved before ``stem_stride`` existed means the full-resolution stem it was trained with."""
    from CovidGANSegLib.checkpoints import save_checkpoint
    from CovidGANSegLib.config import DEFAULT_PREPROCESS
    from CovidGANSegLib.errors import CheckpointError
    from CovidGANSegLib.seg.inference import load_segmenter

    torch.manual_seed(0)
    old = TransUNet(TINY)
    old_config = {k: v for k, v in TINY.to_dict().items() if k != "stem_stride"}
    path = save_checkpoint(tmp_path / "old.pt", kind="seg", arch="transunet", config=old_config, preprocess=DEFAULT_PREPROCESS.to_dict(),
                           model=old.state_dict(), threshold=0.5)
    model, _ = load_segmenter(path)
    assert model.config.stem_stride == 1
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), old.eval()(x), atol=1e-6)
    # weights of the full-resolution stem under a stride-2 configuration: a clear refusal
    bad = save_checkpoint(tmp_path / "bad.pt", kind="seg", arch="transunet", config=TINY_S2.to_dict(),
                          preprocess=DEFAULT_PREPROCESS.to_dict(), model=old.state_dict(), threshold=0.5)
    with pytest.raises(CheckpointError, match="weights do not match the stored transunet configuration"):
        load_segmenter(bad)

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

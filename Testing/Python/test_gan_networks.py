"""3D GAN networks and configurations: shapes, output range, argument checks (paper eq. 1)."""

from __future__ import annotations

import json

import pytest
import torch

from CovidGANSegLib.gan.networks import (
    GAN_CONFIGS,
    DenseUNetGenerator3D,
    Discriminator3D,
    GANConfig,
    count_parameters,
    get_gan_config,
    perlin_noise_torch,
    resolve_device,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _grid_dhw(cfg: GANConfig) -> tuple[int, int, int]:
    x, y, z = cfg.grid
    return (z, y, x)


@pytest.mark.parametrize("name", ["tiny", "quick"])
def test_shapes_and_range(name):
    cfg = get_gan_config(name)
    g, d = DenseUNetGenerator3D(cfg), Discriminator3D(cfg)
    x = torch.rand(2, 1, *_grid_dhw(cfg))
    lung = torch.zeros_like(x, dtype=torch.bool)
    lung[..., 2:-2, 4:-4, 4:-4] = True
    y = g(x, lung).detach()  # training mode: latent noise on
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert d(y).detach().shape == (2, 1)


def test_paper_configuration_forward_once():
    cfg = get_gan_config("paper")
    assert cfg.filters == (8, 16, 32, 64, 128) and cfg.batch_size == 8 and cfg.iterations == 10000
    assert cfg.lr_g == 5e-5 and cfg.lr_step == 1000 and cfg.lr_gamma == 0.9 and cfg.loss == "log"
    g, d = DenseUNetGenerator3D(cfg).eval(), Discriminator3D(cfg)
    assert 1_000_000 < count_parameters(g) < 10_000_000
    x = torch.rand(1, 1, 32, 128, 128)
    with torch.inference_mode():
        y = g(x)
        assert y.shape == (1, 1, 32, 128, 128)
        assert d(x).shape == (1, 1)


def test_residual_generator_is_identity_outside_lungs_and_only_darkens():
    cfg = get_gan_config("tiny")
    g = DenseUNetGenerator3D(cfg)
    x = torch.rand(2, 1, *_grid_dhw(cfg))
    lung = torch.zeros_like(x, dtype=torch.bool)
    lung[:, :, :, 8:24, 8:24] = True
    with torch.no_grad():
        y = g(x, lung)
    assert torch.equal(y[~lung], x[~lung])  # identical outside the lungs
    assert bool(((x - y) >= 0).all())  # eq. 3 difference is non-negative
    # an untrained G is close to the identity (small initial removal fraction)
    assert float((x - y).abs().max()) < 0.1


def test_other_grids_divisible_by_2_pow_depth():
    cfg = get_gan_config("tiny")  # depth 2 -> divisible by 4
    g = DenseUNetGenerator3D(cfg).eval()
    for shape in [(4, 12, 20), (8, 8, 8), (12, 32, 16)]:
        assert g(torch.rand(1, 1, *shape)).shape == (1, 1, *shape)
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.rand(1, 1, 6, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        g(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        g(torch.rand(1, 2, 8, 32, 32))
    with pytest.raises(ValueError, match="lung_mask"):
        g(torch.rand(1, 1, 8, 32, 32), torch.ones(1, 1, 8, 32, 16, dtype=torch.bool))
    with pytest.raises(ValueError):
        Discriminator3D(cfg)(torch.rand(2, 8, 32, 32))


def test_latent_noise_train_only_and_deterministic_inference():
    cfg = get_gan_config("tiny")
    g = DenseUNetGenerator3D(cfg)
    x = torch.rand(1, 1, *_grid_dhw(cfg))
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), g(x))  # eval: the noise's expectation (zero), reproducible
        g.train()
        a, b = g(x), g(x)
    assert not torch.equal(a, b)  # eq. 1: U_N changes the output in training


@pytest.mark.parametrize("output,noise,norm,loss", [("direct", "perlin", "batch", "lsgan"), ("residual", "none", "none", "log-saturating")])
def test_config_variants(output, noise, norm, loss):
    cfg = GANConfig(**{**GAN_CONFIGS["tiny"].to_dict(), "output": output, "noise": noise, "norm": norm, "loss": loss,
                       "filters": (4, 8, 16), "disc_filters": (4, 8, 8, 8), "betas": (0.5, 0.999), "grid": (32, 32, 8)})
    g = DenseUNetGenerator3D(cfg)
    y = g(torch.rand(2, 1, 8, 32, 32)).detach()
    assert y.shape == (2, 1, 8, 32, 32) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_gradient_checkpointing_gives_same_gradients():
    base = GAN_CONFIGS["tiny"]
    cfg = GANConfig(**{**base.to_dict(), "gradient_checkpointing": True, "filters": tuple(base.filters),
                       "disc_filters": tuple(base.disc_filters), "betas": tuple(base.betas), "grid": tuple(base.grid)})
    g1 = DenseUNetGenerator3D(base)
    g2 = DenseUNetGenerator3D(cfg)
    g2.load_state_dict(g1.state_dict())
    x = torch.rand(1, 1, 8, 32, 32)
    for g in (g1, g2):
        g.zero_grad()
        g(x, noise=False).square().mean().backward()
    for p1, p2 in zip(g1.parameters(), g2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad)


def test_perlin_noise_range_and_shape():
    n = perlin_noise_torch((3, 2, 8, 8), (1, 2, 2))
    assert n.shape == (3, 2, 8, 8)
    assert float(n.abs().max()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        perlin_noise_torch((2, 8, 8), (1, 2, 2))


def test_get_gan_config_names_json_and_errors(tmp_path):
    assert get_gan_config("paper") is GAN_CONFIGS["paper"]
    cfg = get_gan_config(GAN_CONFIGS["tiny"])
    assert cfg.name == "tiny"
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"base": "quick", "iterations": 7, "loss": "lsgan"}))
    mine = get_gan_config(f)
    assert mine.iterations == 7 and mine.loss == "lsgan" and mine.filters == GAN_CONFIGS["quick"].filters and mine.name == "mine"
    assert GANConfig.from_dict(mine.to_dict()) == mine  # JSON round trip
    with pytest.raises(ValueError, match="unknown GAN config"):
        get_gan_config("huge")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"iteratons": 3}))
    with pytest.raises(ValueError, match="unknown GAN config fields"):
        get_gan_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        get_gan_config(bad)
    with pytest.raises(ValueError):
        get_gan_config(tmp_path / "missing.json")


@pytest.mark.parametrize("field,value", [
    ("filters", (8,)), ("disc_filters", (8, 8, 8)), ("norm", "layer"), ("output", "tanh"), ("noise", "gauss"),
    ("loss", "wgan"), ("lr_g", 0.0), ("lr_gamma", 1.5), ("batch_size", 0), ("grid", (30, 32, 8)), ("betas", (0.5, 1.0)),
    ("adv_weight", -1.0), ("noise_scale", -0.1),
])
def test_gan_config_value_errors(field, value):
    with pytest.raises(ValueError):
        GANConfig(**{**GAN_CONFIGS["tiny"].to_dict(), field: value})


def test_constructor_and_device_errors():
    with pytest.raises(ValueError):
        DenseUNetGenerator3D({"filters": [4, 8]})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Discriminator3D("tiny")  # type: ignore[arg-type]
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")

"""Training plans: named plans, TOML round trip, --set overrides, and clear errors naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from CovidGANSegLib import demo
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.gan.networks import GAN_CONFIGS
from CovidGANSegLib.plan import PLANS_DIR, load_plan, named_plans, parse_override, plan_hash
from CovidGANSegLib.seg.transunet import SEG_CONFIGS


def test_named_plans_ship_with_the_package_and_mean_what_they_say():
    assert named_plans() == ["paper", "quick", "tiny"]
    paper = load_plan("paper")
    assert paper.gan == GAN_CONFIGS["paper"] and paper.preprocess.grid == (128, 128, 32)
    assert paper.segmenter.config == SEG_CONFIGS["paper"] and paper.segmenter.models == ("transunet",)
    quick = load_plan("quick")  # the demo's QUICK sizes
    assert quick.preprocess.grid == demo.QUICK.grid and quick.segmenter.grid == demo.QUICK.seg_grid
    assert quick.gan.name == demo.QUICK.gan_config and quick.gan.iterations == demo.QUICK.gan_iterations
    assert quick.segmenter.config.name == demo.QUICK.seg_config and quick.segmenter.config.iterations == demo.QUICK.seg_iterations
    assert all(quick.segmenter.iterations_of(m) == demo.QUICK.seg_iterations_of(m) for m in ("transunet", "unet"))
    assert quick.segmenter.iterations_of("unet") < quick.segmenter.iterations_of("transunet")  # 500 and 1,000
    assert quick.run.seed == demo.QUICK.seed and quick.segmenter.synthetic.fraction == demo.QUICK.synthetic_fraction
    tiny = load_plan("tiny")
    assert tiny.gan.grid == tiny.preprocess.grid == (32, 32, 8) and tiny.run.device == "cpu"


def test_package_data_lists_the_plans():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'CovidGANSegLib = ["plans/*.toml"]' in text and "tomli>=2; python_version<'3.11'" in text
    assert sorted(p.name for p in PLANS_DIR.glob("*.toml")) == ["paper.toml", "quick.toml", "tiny.toml"]


@pytest.mark.parametrize("name", ["paper", "quick", "tiny"])
def test_effective_plan_round_trips_through_toml(name, tmp_path):
    plan = load_plan(name, ["gan.iterations=7", "segmenter.synthetic.coverage=[0.01, 0.5]"])
    path = tmp_path / "plan.toml"
    path.write_text(plan.to_toml())
    again = load_plan(path)
    assert again == plan and again.hash() == plan.hash()
    assert again.gan.iterations == 7 and again.segmenter.synthetic.coverage == (0.01, 0.5)


def test_set_values_are_toml_and_change_the_hash():
    base = load_plan("tiny")
    plan = load_plan("tiny", ["gan.iterations=30", "preprocess.grid=[64,64,16]", "run.device=cpu", "run.deterministic=true",
                              "segmenter.models=['unet']", "segmenter.grid=[48, 48, 8]", "pseudo_masks.rule=paper"])
    assert plan.gan.iterations == 30 and plan.preprocess.grid == (64, 64, 16) and plan.gan.grid == (64, 64, 16)
    assert plan.run.deterministic is True and plan.segmenter.models == ("unet",) and plan.segmenter.grid == (48, 48, 8)
    assert plan.pseudo_masks.rule == "paper"
    assert plan.hash() != base.hash()
    assert plan.hash("segmenter") != base.hash("segmenter") and load_plan("tiny", ["gan.iterations=9"]).hash("segmenter") == base.hash("segmenter")
    assert parse_override("gan.lr_g=1e-4") == (["gan", "lr_g"], 1e-4)
    assert base.segmenter.config.cpu_bf16 is False and load_plan("tiny", ["segmenter.cpu_bf16=true"]).segmenter.config.cpu_bf16 is True
    assert plan_hash({"a": 1}) == plan_hash({"a": 1}) != plan_hash({"a": 2})


def test_a_model_s_own_iterations(tmp_path):
    base = load_plan("tiny")
    plan = load_plan("tiny", ["segmenter.unet.iterations=9"])
    assert plan.segmenter.iterations_of("unet") == 9 == plan.segmenter.config_for("unet").iterations
    assert plan.segmenter.iterations_of("transunet") == base.segmenter.config.iterations != 9
    assert plan.segmenter.config_for("transunet") == base.segmenter.config
    path = tmp_path / "plan.toml"
    path.write_text(plan.to_toml())
    assert "[segmenter.unet]" in path.read_text() and load_plan(path) == plan
    # a file sets it the same way, and a --set on top wins
    path.write_text('base = "tiny"\n[segmenter.unet]\niterations = 9\n')
    assert load_plan(path) == plan and load_plan(path, ["segmenter.unet.iterations=3"]).segmenter.iterations_of("unet") == 3


def test_plan_file_with_a_base(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "tiny"\n[gan]\niterations = 5\n[segmenter]\nmodels = ["unet"]\n')
    plan = load_plan(path)
    assert plan.gan.iterations == 5 and plan.gan.name == "tiny" and plan.segmenter.models == ("unet",)


@pytest.mark.parametrize("override, words", [
    ("gan.iterationz=3", ["--set 'gan.iterationz=3'", "gan.iterationz", "unknown key"]),
    ("gan.iterations=abc", ["gan.iterations", "must be an integer"]),
    ("gan.iterations='3'", ["gan.iterations", "must be an integer"]),
    ("gan.iterations=0", ["--set 'gan.iterations=0'", "iterations must be >= 1"]),
    ("gan.iterations", ["expected section.key=value"]),
    ("nosuch.key=1", ["unknown section [nosuch]"]),
    ("preprocess.grid=[30,32,8]", ["preprocess.grid", "divisible by 4"]),
    ("preprocess.grid=[32,32]", ["preprocess", "grid must be three sizes"]),
    ("gan.grid=[32,32,8]", ["gan.grid", "preprocess.grid"]),
    ("segmenter.image_size=64", ["segmenter.image_size", "segmenter.grid"]),
    ("segmenter.models=['resnet']", ["segmenter", "resnet"]),
    ("segmenter.synthetic.fraction=2", ["segmenter.synthetic", "fraction must be in [0, 1]"]),
    ("segmenter.synthetic.colour=1", ["segmenter.synthetic.colour", "unknown key"]),
    ("segmenter.unet.batch_size=2", ["segmenter.unet.batch_size", "sets only iterations"]),
    ("segmenter.unet.iterations=0", ["segmenter.unet.iterations", "must be >= 1"]),
    ("segmenter.unet.iterations=1.5", ["segmenter.unet.iterations", "must be an integer"]),
    ("segmenter.unet=5", ["segmenter.unet", "must be a table"]),
    ("run.device=tpu", ["run", "tpu"]),
    ("run.seed=1.5", ["run.seed", "must be an integer"]),
    ("gan.config=huge", ["gan.config", "huge"]),
    ("gan.lr_g=[1, 2", ["not a TOML value"]),
])
def test_bad_overrides_name_the_set_and_the_key(override, words):
    with pytest.raises(InputError) as info:
        load_plan("tiny", [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text, words", [
    ("[gan]\niterationz = 3\n", ["gan.iterationz", "unknown key"]),
    ("[gann]\niterations = 3\n", ["unknown section [gann]"]),
    ("[gan]\niterations = -3\n", ["gan", "iterations must be >= 1"]),
    ("[gan\n", ["not a valid TOML plan"]),
    ('base = "huge"\n', ["base", "huge"]),
    ("[run]\ndeterministic = 1\n", ["run.deterministic", "true or false"]),
])
def test_bad_plan_files_name_the_file_and_the_key(tmp_path, text, words):
    path = tmp_path / "bad plan.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_plan(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_plan_name_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown plan 'huge'"):
        load_plan("huge")
    with pytest.raises(InputError, match="plan file not found"):
        load_plan(tmp_path / "missing.toml")

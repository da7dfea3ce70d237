import pytest

from backbone.errors import ConfigError
from experiments.config import CONFIG_DIR, load_config


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_is_valid(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.pretrain.epochs >= 1


def test_overrides_are_typed_and_nested():
    cfg = load_config("quickstart", ["pretrain.lr=0.05", "model.arch=resnet14", "data.root=/x", "pretrain.milestones=[0.3, 0.6]"])
    assert cfg.pretrain.lr == 0.05 and cfg.model.arch == "resnet14" and cfg.data.root == "/x"
    assert cfg.pretrain.milestones == [0.3, 0.6]
    assert load_config("quickstart", ["pretrain.lr=1"]).pretrain.lr == 1.0  # int accepted for float


@pytest.mark.parametrize(
    "override,message",
    [
        ("pretrain.lrr=0.1", "unknown config key 'pretrain.lrr' (did you mean 'pretrain.lr'?)"),
        ("modle.arch=resnet20", "unknown config key 'modle' (did you mean 'model'?)"),
        ("pretrain.lr=abc", "config key 'pretrain.lr' must be of type float"),
        ("pretrain.epochs=2.5", "config key 'pretrain.epochs' must be of type int"),
        ("pretrain.nesterov=1", "config key 'pretrain.nesterov' must be true or false"),
        ("pretrain.batch_size=0", "batch_size must be >= 1"),
        ("pretrain.stochastic_depth=1.5", "stochastic_depth"),
        ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1)"),
        ("data.name=imagenet", "data.name must be one of"),
        ("model.arch=resnet21", "6n+2"),
        ("model.arch=vgg", "unknown architecture"),
        ("model.shortcut=C", "model.shortcut"),
        ("model.normalization=foo", "model.normalization"),
        ("name=a/b", "plain directory name"),
        ("pretrain=3", "pretrain must be a mapping"),
        ("novalue", "key=value"),
        ("policy.ladder_min_blocks=-1", "policy.ladder_min_blocks must be >= 0"),
        ("finetune.distill=-1", "distill must be >= 0"),
        ("pretrain.distill=1", "pretrain.distill distils from the weights the run starts from"),
        ("study.leave_out=[gates,stattic]", "study.leave_out must be a list of"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", [override])
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found .*quickstart"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


@pytest.mark.parametrize("preset,arch,blocks", [("imagenet_resnet50", "resnet50", 16), ("imagenet_resnet101", "resnet101", 33)])
def test_imagenet_presets_are_streamed_torchvision_studies_marked_unmeasured(preset, arch, blocks):
    from backbone.models.torchvision_resnet import ARCHS, resolve_weights

    cfg = load_config(preset)
    assert "UNMEASURED until run on a GPU" in (CONFIG_DIR / f"{preset}.yaml").read_text()
    assert cfg.data.streamed and cfg.data.root == "/path/to/imagenet" and cfg.data.image_size == 224
    assert cfg.data.max_policy_images is not None  # the env's images in memory are bounded
    assert cfg.model.arch == f"tv_{arch}" and sum(ARCHS[arch][1]) == blocks
    assert resolve_weights(arch, cfg.model.weights).name == "IMAGENET1K_V2"  # names torchvision's weights; no download
    assert (cfg.policy.observation, cfg.policy.action, cfg.policy.obs_size) == ("stem", "ladder", 112)
    assert cfg.study.budgets and cfg.study.static_epochs >= 1
    for batch in (cfg.pretrain.batch_size, cfg.finetune.batch_size):
        assert batch % 8 == 0  # splits evenly over 8 GPUs under torchrun


def test_data_caps_are_validated():
    with pytest.raises(ConfigError, match="max_policy_images must be >= 1"):
        load_config("quickstart", ["data.max_policy_images=0"])
    assert load_config("quickstart", ["data.max_policy_images=500"]).data.max_policy_images == 500

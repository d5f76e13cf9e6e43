"""Config composition and validation: every mistake is one line naming the key."""

import pytest

from conftest import entry_point, one_line_error

from clipdist.config import ConfigError, global_batch, load_config, validate

RECIPES = ["rn50", "vitb32", "vitb16", "vitl14"]


def config_error(overrides, world_size=2):
    with pytest.raises(ConfigError) as info:
        cfg, _ = load_config(overrides)
        validate(cfg, world_size)
    message = str(info.value)
    assert "\n" not in message, f"error should be one line: {message!r}"
    return message


def test_unknown_key_names_the_key():
    assert config_error(["data.local_btach=4"]).startswith("data.local_btach:")


def test_wrong_type_names_the_key():
    assert config_error(["data.local_batch=many"]).startswith("data.local_batch:")


def test_unknown_experiment_lists_the_options():
    message = config_error(["+experiment=vitg14"])
    assert "experiment/vitg14" in message and "vitl14" in message


def test_global_batch_must_equal_local_times_world_times_accumulation():
    message = config_error(["+experiment=digits", "train.global_batch=100"], world_size=2)
    assert message.startswith("train.global_batch:") and "= 128" in message


@pytest.mark.parametrize("world_size, accum", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_auto_accumulation_keeps_the_global_batch_on_any_world_size(world_size, accum):
    cfg, _ = load_config(["+experiment=digits", "train.global_batch=512", "train.accum_steps=auto"])
    validate(cfg, world_size)
    assert cfg.train.accum_steps == accum and global_batch(cfg, world_size) == 512


def test_auto_accumulation_refuses_a_global_batch_it_cannot_reach():
    auto = ["+experiment=digits", "train.accum_steps=auto"]
    assert config_error([*auto, "train.global_batch=null"]) == "train.accum_steps: auto keeps train.global_batch: set it too (e.g. train.global_batch=4096)"
    assert config_error([*auto, "train.global_batch=192"], world_size=4) == (
        "train.global_batch: 192 is not reachable on 4 rank(s) with data.local_batch=64 (train.accum_steps=auto needs a multiple of 256); "
        "choose a data.local_batch that divides 192 / 4"
    )
    assert config_error([*auto, "train.global_batch=128"], world_size=3).endswith("3 does not divide it")
    assert config_error(["+experiment=digits", "train.accum_steps=often"]) == "train.accum_steps: expected an integer or 'auto', got 'often'"


def test_shard_pattern_matching_nothing_names_the_key(tmp_path):
    pattern = str(tmp_path / "missing-{000..003}.tar")
    message = config_error(["data=webdataset", f"data.train_urls='{pattern}'"])
    assert message.startswith("data.train_urls:") and "missing-000.tar" in message


def test_bad_enum_value_names_the_key():
    assert config_error(["deepspeed.zero_stage=4"]).startswith("deepspeed.zero_stage:")
    assert config_error(["loss.impl=softmax"]).startswith("loss.impl:")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_describe_a_global_batch_of_at_least_4096(recipe):
    cfg, _ = load_config([f"+experiment={recipe}"])
    recipe_world = cfg.launch.nodes * cfg.launch.gpus_per_node
    assert global_batch(cfg, recipe_world) >= 4096
    assert cfg.deepspeed.precision == "bf16" and cfg.deepspeed.zero_stage in (1, 2)
    if recipe.startswith("vit"):
        assert cfg.model.grad_checkpointing


def test_recipe_runs_small_with_overrides():
    cfg, _ = load_config(["+experiment=rn50", "data=digits", "train.max_steps=2", "data.local_batch=4"])
    validate(cfg, 2, check_data=False)
    assert (cfg.model.name, cfg.model.vision.image_size, cfg.data.local_batch, cfg.data.name) == ("RN50", 224, 4, "digits")


@pytest.mark.parametrize(
    "override, line",
    [
        ("data.local_btach=4", "clipdist: config error: data.local_btach: Key 'local_btach' not in 'DataConfig'"),
        ("optim.lr=-0.001", "clipdist: config error: optim.lr: must be > 0, got -0.001"),  # was PyTorch's traceback
    ],
    ids=["unknown_key", "negative_lr"],
)
def test_cli_prints_one_line_and_exits_2(override, line):
    assert one_line_error(entry_point("clipdist.train", override), "config error") == line


@pytest.mark.parametrize(
    "override",
    ["optim.lr=0", "optim.weight_decay=-0.1", "optim.beta1=1.0", "optim.beta2=-0.5", "optim.eps=0", "optim.warmup_steps=-1",
     "optim.min_lr_ratio=1.5"],
)
def test_optimizer_settings_name_the_key(override):
    key, value = override.split("=")
    message = config_error(["+experiment=tiny", override])
    assert message.startswith(f"{key}: must be ") and float(message.rsplit("got ", 1)[1]) == float(value), message


def test_optimizer_settings_at_their_bounds_are_valid():
    cfg, _ = load_config(["+experiment=tiny", "optim.weight_decay=0", "optim.beta1=0", "optim.warmup_steps=0", "optim.min_lr_ratio=1"])
    validate(cfg, 2, check_data=False)


def test_unquoted_brace_pattern_explains_the_quoting():
    message = config_error(["data.train_urls=shards/{000..003}.tar"])
    assert "quote values with braces" in message


def test_eval_set_errors_name_the_key(tmp_path):
    assert config_error(["eval.zero_shot.0.templates=imagenet81"]).startswith("eval.zero_shot[0].templates: unknown template set 'imagenet81'")
    assert config_error(["eval.zero_shot.0.templates=[a photo]"]).startswith("eval.zero_shot[0].templates[0]: every template needs a '{}'")
    assert config_error(["eval.retrieval.0.name=my/set"]).startswith("eval.retrieval[0].name:")
    twice = "eval.zero_shot=[{name: a, urls: x.tar, classnames: [c]}, {name: a, urls: y.tar, classnames: [d]}]"
    assert config_error([twice]).startswith("eval.zero_shot: set names must differ")
    train = tmp_path / "train-0.tar"
    train.touch()
    missing = tmp_path / "coco-{0..1}.tar"
    message = config_error(["data=webdataset", f"data.train_urls='{train}'", f"eval.retrieval=[{{name: coco, urls: '{missing}'}}]"])
    assert message.startswith("eval.retrieval[0].urls: 2 shard(s) match no file") and "coco-0.tar" in message
    names = tmp_path / "names.txt"
    message = config_error(["data=webdataset", f"data.train_urls='{train}'", f"eval.zero_shot=[{{name: s, urls: '{train}', classnames: '{names}'}}]"])
    assert message == f"eval.zero_shot[0].classnames: no file {names}"


def test_eval_sets_compose_from_yaml_and_overrides(tmp_path):
    cfg, _ = load_config(["+experiment=digits", "eval.zero_shot.0.templates=short", f"eval.retrieval.0.urls='{tmp_path}/e.tar'"])
    validate(cfg, 2, check_data=False)
    (zero_shot,), (retrieval,) = cfg.eval.zero_shot, cfg.eval.retrieval
    assert (zero_shot.name, zero_shot.templates, len(zero_shot.classnames)) == ("digits", "short", 10)
    assert (retrieval.name, retrieval.urls) == ("digits", f"{tmp_path}/e.tar")
    cfg, _ = load_config(["+experiment=vitb32"])
    assert cfg.eval.zero_shot == [] and cfg.eval.retrieval == []


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.fault_timeout_s=0", "train.fault_timeout_s"),
        ("train.max_bad_steps=0", "train.max_bad_steps"),
        ("model.patch_dropout=1.0", "model.patch_dropout"),
        ("model.lock_image=true", "model.lock_image"),  # nothing pretrained to lock
        ("logging.peak_tflops=-1", "logging.peak_tflops"),
        ("logging.wandb_init_timeout_s=0", "logging.wandb_init_timeout_s"),
    ],
)
def test_fault_and_speed_settings_name_the_key(override, key):
    assert config_error(["+experiment=tiny", override]).startswith(f"{key}:")


def test_patch_dropout_is_for_vit_towers():
    message = config_error(["+experiment=digits", "model.patch_dropout=0.5"])
    assert message == "model.patch_dropout: drops ViT patches; model.vision.arch is resnet"


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (["data.retries=-1"], "data.retries", "must be >= 0"),
        (["launch.socket_ifname='lo,nope0'"], "launch.socket_ifname", "'nope0'"),
        (["data.train_samples=1000"], "data.train_samples", "resampled only"),  # exact mode needs per-shard counts
        (["data.mode=resampled", "data.train_samples=0"], "data.train_samples", "must be >= 1"),
        (["data.train_urls=tests/fixtures/img2dataset/00000.tar", "data.train_index=/no/such/index.json"], "data.train_index",
         "no such file"),
        (["data.train_urls=null", "+data.sources=[{urls: 'a.tar'}]", "data.train_index=i.json"], "data.train_index",
         "data.sources[i].index"),
    ],
)
def test_remote_data_settings_name_the_key(overrides, key, says):
    message = config_error(["+experiment=tiny", "data.generate_digits=false", *overrides])
    assert message.startswith(f"{key}:") and says in message, message

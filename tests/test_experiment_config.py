"""Experiment configs: the shipped files, base chains, overrides, overlays, and errors that name key and file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lightning_fhe.simulate.components import site_init_args
from lightning_fhe.simulate.config import (
    SCHEMA,
    ConfigError,
    FreeForm,
    load_experiment,
    merge,
    setting_label,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BASE = CONFIGS / "base.yaml"
QUICKSTART = CONFIGS / "experiments" / "quickstart.yaml"
SETTINGS = {"raw": "none", "he_full": "all", "he_conv": "conv", "he_key_layers": "key_layers"}  # name: encrypt
SPLEEN = {name: CONFIGS / "experiments" / f"spleen_{name}.yaml" for name in SETTINGS}


def experiment_file(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {BASE}\n" + text)
    return path


def schema_keys(schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, sub in schema.items():
        if isinstance(sub, dict):
            keys |= schema_keys(sub, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def config_keys(config: dict, schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        sub = schema.get(key)
        if isinstance(sub, dict) and isinstance(value, dict):
            keys |= config_keys(value, sub, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


# ------------------------------------------------------------------------------------------------ shipped files


def test_base_sets_every_key_of_the_schema_with_a_comment():
    raw = yaml.safe_load(BASE.read_text())
    assert config_keys(raw, SCHEMA) == schema_keys(SCHEMA)
    for number, line in enumerate(BASE.read_text().splitlines(), 1):
        if re.match(r"^\s*[a-z_]+:", line) and not line.lstrip().startswith("#"):
            assert "#" in line, f"base.yaml line {number} has no comment: {line!r}"


def test_base_is_the_seeds_experiment():
    config = load_experiment(BASE).config
    assert (config["federation"]["rounds"], config["federation"]["local_epochs"]) == (100, 10)
    assert config["model"]["class_path"] == "lightning_fhe.tasks.SpleenSegmentation"
    assert config["model"]["init_args"]["init_filters"] == 16
    assert config["he"]["config"] == {
        "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40, "scheme": "CKKS"
    }  # fmt: skip
    assert config["data"]["class_path"] == "lightning_fhe.tasks.MSDDataModule"
    assert config["data"]["per_site"] == {"data_fraction": [1.0, 0.5]}
    assert config["privacy"] is None and config["federation"]["strategy"] is None


def test_quickstart_is_small():
    config = load_experiment(QUICKSTART).config
    assert config["experiment"]["name"] == "quickstart"
    assert config["federation"]["sites"] == 2
    assert config["federation"]["rounds"] * config["federation"]["local_epochs"] <= 20
    assert config["model"]["init_args"]["init_filters"] == 8
    data = config["data"]["init_args"]
    assert data["root"] is None and data["synthetic"]["size"] == [48, 48, 48]
    assert config["trainer"]["accelerator"] == "cpu" and config["trainer"]["deterministic"] is True


@pytest.mark.parametrize("setting, encrypt", SETTINGS.items())
def test_spleen_files_hold_the_seeds_settings_and_need_the_data(setting, encrypt):
    with pytest.raises(
        ConfigError, match=r"spleen_.*\.yaml: data\.init_args\.root: required and not set.*data\.init_args\.root="
    ):
        load_experiment(SPLEEN[setting])
    config = load_experiment(SPLEEN[setting], ["data.init_args.root=/data/Task09_Spleen"]).config
    assert config["federation"]["encrypt"] == encrypt
    assert (config["federation"]["rounds"], config["federation"]["local_epochs"]) == (100, 10)
    assert config["model"]["init_args"]["init_filters"] == 16
    assert config["data"]["init_args"]["root"] == "/data/Task09_Spleen"
    assert setting_label(config) == setting
    for sites in (4, 8):  # the seed's other rows
        config = load_experiment(SPLEEN[setting], ["data.init_args.root=null", f"federation.sites={sites}"]).config
        assert config["federation"]["sites"] == sites


def test_default_compare_settings():
    experiment = load_experiment(QUICKSTART)
    assert {*SETTINGS, "dp_gaussian", "partial_10", "svt"} <= set(experiment.overlays)
    assert experiment.setting("raw")["federation"]["encrypt"] == "none"
    assert experiment.setting("he_key_layers")["federation"]["encrypt"] == "key_layers"
    assert experiment.setting("partial_10")["privacy"] == {"partial": {"fraction": 0.1}}
    # an overlay changes only what it names
    assert experiment.setting("raw")["model"] == experiment.config["model"]
    assert "compare" not in experiment.setting("raw")


# ------------------------------------------------------------------------------------------------ merging


def test_file_over_base_and_command_line_over_file(tmp_path):
    path = experiment_file(tmp_path, "federation: {rounds: 7, sites: 3}\n")
    overrides = ["federation.sites=4", "data.per_site.data_fraction=[1.0, 0.25]", "model.init_args.lr=0.01"]
    config = load_experiment(path, overrides).config
    assert config["federation"]["rounds"] == 7
    assert config["federation"]["sites"] == 4
    assert config["federation"]["local_epochs"] == 10  # from base
    assert config["data"]["per_site"]["data_fraction"] == [1.0, 0.25]
    assert config["model"]["init_args"]["lr"] == 0.01


def test_chains_of_base_files_and_interpolation(tmp_path):
    middle = experiment_file(tmp_path, "federation: {rounds: 4}\n", "middle.yaml")
    top = tmp_path / "top.yaml"
    top.write_text(f"base: {middle.name}\nfederation: {{round_timeout_s: '${{federation.rounds}}'}}\n")
    config = load_experiment(top, ["federation.rounds=6"]).config
    assert config["federation"]["rounds"] == 6
    assert config["federation"]["round_timeout_s"] == 6


def test_a_base_chain_that_loops_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_experiment(tmp_path / "a.yaml")


def test_a_privacy_block_naming_another_mechanism_replaces_the_one_below():
    below = {"privacy": {"gaussian": {"clip_norm": 1.0, "noise_multiplier": 1.0}}}
    assert merge(below, {"privacy": {"partial": {"fraction": 0.1}}}) == {"privacy": {"partial": {"fraction": 0.1}}}
    assert merge(below, {"privacy": {"gaussian": {"noise_multiplier": 2.0}}}) == {
        "privacy": {"gaussian": {"clip_norm": 1.0, "noise_multiplier": 2.0}}
    }
    config = load_experiment(QUICKSTART, ["privacy={svt: {fraction: 0.1, epsilon: 1.0, clip_bound: 0.01}}"]).config
    assert list(config["privacy"]) == ["svt"]


def test_overlays_can_be_added_and_changed_on_the_command_line():
    experiment = load_experiment(
        QUICKSTART,
        ["compare.slow_lr.model.init_args.lr=0.0001", "compare.dp_gaussian.privacy.gaussian.noise_multiplier=2.0"],
    )
    assert experiment.setting("slow_lr")["model"]["init_args"]["lr"] == 0.0001
    assert experiment.setting("dp_gaussian")["privacy"]["gaussian"]["noise_multiplier"] == 2.0


def test_per_site_init_args_repeat_a_list_over_the_sites():
    block = {"init_args": {"batch_size": 2}, "per_site": {"data_fraction": [1.0, 0.5]}}
    assert [site_init_args(block, i)["data_fraction"] for i in range(4)] == [1.0, 0.5, 1.0, 0.5]
    assert site_init_args(block, 3)["batch_size"] == 2


def test_a_block_with_another_class_path_replaces_the_one_below(tmp_path):
    below = {"data": {"class_path": "a.A", "init_args": {"x": 1}, "per_site": {"y": [1]}}}
    assert merge(below, {"data": {"init_args": {"z": 2}}})["data"]["init_args"] == {"x": 1, "z": 2}
    assert merge(below, {"data": {"class_path": "b.B", "init_args": {"z": 2}}}) == {
        "data": {"class_path": "b.B", "init_args": {"z": 2}}
    }
    assert merge({"strategy": {"fedavg": {"lr": 1.0}}}, {"strategy": {"fedadam": {"lr": 0.1}}}) == {
        "strategy": {"fedadam": {"lr": 0.1}}
    }


def test_strategies_are_compared_by_name():
    experiment = load_experiment(CONFIGS / "experiments" / "noniid_classification.yaml")
    assert experiment.config["data"]["class_path"] == "lightning_fhe.tasks.SyntheticClassificationData"
    assert "per_site" not in experiment.config["data"]  # the spleen's data_fraction went with its class
    assert experiment.setting("fedavg")["federation"]["strategy"] == "fedavg"
    assert experiment.setting("fedyogi")["federation"]["strategy"] == {"fedyogi": {"lr": 0.03, "tau": 1.0e-3}}


def test_setting_label_names_encryption_strategy_and_privacy():
    config = load_experiment(QUICKSTART).config
    assert setting_label(config) == "he_full"
    assert setting_label({**config, "federation": {"encrypt": ["net.*"]}}) == "he_custom"
    assert setting_label({**config, "privacy": [{"gaussian": {}}, {"partial": {}}]}) == "he_full+gaussian+partial"
    assert setting_label({**config, "federation": {"encrypt": "none", "strategy": {"fedadam": {}}}}) == "raw+fedadam"


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federation.round=3"], "command line: unknown key 'federation.round' (did you mean 'federation.rounds'?)"),
        (["federation.rounds=0"], "command line: federation.rounds: expected an integer >= 1, got 0"),
        (["federation.encrypt=everything"], "command line: federation.encrypt: expected one of all, conv, key_layers"),
        (["federation.min_clients=3"], "command line: federation.min_clients: 3 is more than the 2 sites"),
        (
            ["data.per_site.data_fraction=[1.0, 0]"],
            "command line: data: lightning_fhe.tasks.MSDDataModule(...) refused its arguments "
            "(site-2's): ValueError: data_fraction",
        ),
        (
            ["model.init_args.init_filters=12"],
            "command line: model: lightning_fhe.tasks.SpleenSegmentation(...) refused its arguments: "
            "ValueError: init_filters must be a positive multiple of 8",
        ),
        (
            ["model.init_args.lr_rate=1"],
            "command line: model.init_args.lr_rate: SpleenSegmentation takes no argument 'lr_rate'; it "
            "takes init_filters, lr, weight_decay",
        ),
        (
            ["model.class_path=lightning_fhe.tasks.NoSuchModel"],
            "command line: model.class_path: 'lightning_fhe.tasks' has no class 'NoSuchModel'",
        ),
        (["model.class_path=no_such_package.Model"], "command line: model.class_path: cannot import 'no_such_package'"),
        (
            ["data.init_args.site_index=1"],
            "command line: data.init_args.site_index: set by the simulator for each site; remove it",
        ),
        (["federation.strategy={fedadam: {}}"], "command line: federation.strategy.fedadam.lr: required"),
        (
            ["federation.strategy=fedyoga"],
            "command line: federation.strategy.fedyoga: unknown strategy; expected one of fedavg, "
            "fedavgm, fedadam, fedyogi, fedadagrad (did you mean 'fedyogi'?)",
        ),
        (["trainer.deterministic=maybe"], "trainer.deterministic: expected true or false or one of 'warn'"),
        (["he.config.scale_bits=59"], "command line: he.config.scale_bits:"),
        (["privacy={gaussian: {clip_norm: -1, noise_multiplier: 1.0}}"], "privacy.gaussian.clip_norm: must be > 0"),
        (["privacy={partial: {fractoin: 0.1}}"], "command line: privacy.partial.fractoin: unknown option"),
        (["compare.raw.federation.encrypt=bogus"], "command line: compare.raw: federation.encrypt: expected one of"),
        (["compare.raw.federation.foo=1"], "command line: compare.raw: unknown key 'federation.foo'"),
        (["compare.raw.experiment.seed=1"], "compare.raw.experiment: an overlay cannot change 'experiment'"),
        (["rounds"], "command line: 'rounds': expected key=value"),
        (["base=other.yaml"], "'base' can only be set in a file"),
    ],
)
def test_command_line_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_experiment(QUICKSTART, overrides)
    assert message in str(error.value)


def test_file_errors_name_the_file_and_the_key(tmp_path):
    path = experiment_file(tmp_path, "federation:\n  rounds: 3\n  local_epoch: 2\n")
    expected = f"{path}: unknown key 'federation.local_epoch' (did you mean 'federation.local_epochs'?)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_experiment(path)

    path = experiment_file(tmp_path, "model: {init_args: {loss: focal}}\n")
    refused = f"{path}: model: lightning_fhe.tasks.SpleenSegmentation(...) refused its arguments: ValueError: loss"
    with pytest.raises(ConfigError, match=re.escape(refused)):
        load_experiment(path)

    # A value set in the file but overridden on the command line is the command line's fault.
    with pytest.raises(ConfigError, match="^command line: model: "):
        load_experiment(path, ["model.init_args.loss=nope"])

    path = experiment_file(tmp_path, "compare: {fast: {model: {init_args: {lr_rate: 0}}}}\n")
    unknown = f"{path}: compare.fast: model.init_args.lr_rate: SpleenSegmentation takes no"
    with pytest.raises(ConfigError, match=re.escape(unknown)):
        load_experiment(path)


def test_yaml_reads_1e_5_as_a_string_and_the_error_says_how_to_write_it(tmp_path):
    path = experiment_file(tmp_path, "privacy_delta: 1e-5\n")
    expected = "privacy_delta: expected a number in (0, 1), got '1e-5' (write 1.0e-5"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_experiment(path)


def test_missing_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_experiment(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("federation: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_experiment(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_experiment(tmp_path / "list.yaml")
    (tmp_path / "alone.yaml").write_text("federation: {rounds: 2}\n")  # forgot `base:`
    with pytest.raises(ConfigError, match=r"alone.yaml: experiment: missing; does the file build on configs/base.yaml"):
        load_experiment(tmp_path / "alone.yaml")


def test_unknown_compare_setting_lists_the_defined_ones():
    experiment = load_experiment(QUICKSTART)
    expected = r"--compare he_ful: no such setting .*defined: raw, he_full.*did you mean 'he_full'"
    with pytest.raises(ConfigError, match=expected):
        experiment.setting("he_ful")


def test_free_form_blocks_are_checked_by_their_owners():
    # he.config and privacy are FreeForm in the schema: their keys are checked by CKKSParams and the privacy
    # module, whose messages carry the full dotted key.
    assert isinstance(SCHEMA["privacy"], FreeForm) and isinstance(SCHEMA["he"]["config"], FreeForm)
    with pytest.raises(ConfigError, match=r"command line: he.config: unknown key\(s\) \['slots'\]"):
        load_experiment(QUICKSTART, ["he.config.slots=4"])

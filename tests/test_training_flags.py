"""TrainConfig <-> flags: one rule spells every field, help and bounds come from the field itself."""
import argparse
import dataclasses

import pytest

from studies.training import flags
from studies.training.config import TrainConfig


def test_one_rule_spells_every_field_and_the_parser_reads_it_back():
    p = argparse.ArgumentParser()
    flags.add_train_args(p)
    spelled = {a.dest: a.option_strings for a in p._actions if a.dest != "help"}
    fields = dataclasses.fields(TrainConfig)
    assert set(spelled) == {f.name for f in fields}
    for f in fields:
        assert spelled[f.name] == [flags.flag(f.name)] and f.metadata["help"]  # help text lives on the field
    assert flags.flag("batch_size") == "--batch-size" and flags.grid_flag("batch_size") == "--batch-sizes"
    assert flags.flag("clip_threshold") == "--lambda" and flags.grid_flag("clip_threshold") == "--lambdas"
    args = p.parse_args(["--lambda", "none", "--batch-size", "128", "--use-gpu", "no",
                         "--model-overrides", '{"width": 8}', "--epochs", "2.5"])
    assert flags.overrides_from_args(args) == {"clip_threshold": None, "clipping": "none", "batch_size": 128,
                                              "use_gpu": False, "model_overrides": {"width": 8}, "epochs": 2.5}
    assert flags.overrides_from_args(p.parse_args([])) == {}  # unset flags leave the preset's values alone
    with pytest.raises(SystemExit):
        p.parse_args(["--model-overrides", "[1, 2]"])  # a JSON object, nothing else


@pytest.mark.parametrize("name, value, text", [
    ("batch_size", 0, "batch_size must be > 0, got 0"),
    ("warmup_epochs", -1.0, "warmup_epochs must be >= 0, got -1.0"),
    ("augment_strength", 1.5, "augment_strength must be in [0, 1], got 1.5"),
    ("label_smoothing", 1.0, "label_smoothing must be in [0, 1), got 1.0"),
    ("divergence_factor", 1.0, "divergence_factor must be > 1, got 1.0"),
    ("loader", "fast", "loader must be one of auto, resident, streaming, got 'fast'"),
    ("base_lr", float("nan"), "base_lr must be a finite number, got nan"),
    ("base_lr", float("inf"), "base_lr must be a finite number, got inf"),  # > 0, yet no learning rate
    ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("weight_decay", -0.1, "weight_decay must be >= 0, got -0.1"),
    ("epochs", 0.0, "epochs must be > 0, got 0.0"),
])
def test_a_field_is_checked_against_its_own_bounds(name, value, text):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{name: value})
    assert str(e.value) == f"invalid TrainConfig: {text}"


@pytest.mark.parametrize("kw, line", [
    (dict(momentum=1.5), "--momentum must be in [0, 1), got 1.5"),
    (dict(clipping="agc", clip_threshold=-1.0),  # λ is --lambda on the command line
     "--lambda (λ for AGC) must be > 0, got -1.0; use clipping='none' to disable"),
    (dict(warmup_epochs=float("nan")), "--warmup-epochs must be a finite number, got nan"),
    (dict(model="resnet9000"), "invalid TrainConfig: unknown model 'resnet9000'"),  # no one flag at fault: as is
])
def test_a_refused_config_names_the_flag_of_its_field(kw, line):
    from studies.training.config import ConfigError

    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert flags.flag_message(e.value).startswith(line) and "\n" not in flags.flag_message(e.value)


@pytest.mark.parametrize("text", ['{"width": NaN}', '{"n_train": Infinity}', '{"a": {"b": -Infinity}}'])
def test_json_settings_refuse_nan_and_infinity(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a number this setting can hold"):
        flags.parse_json_dict(text)


def test_train_py_names_the_flag_of_a_refused_setting(capsys):
    from studies import train

    with pytest.raises(SystemExit):
        train.main(["--momentum", "1.5"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(": error: --momentum must be in [0, 1), got 1.5")

"""TrainConfig: validated on construction, each field's bounds and help in one place; the flags."""
import dataclasses
import typing

import pytest

from studies.training.config import TrainConfig
from tests.helpers import tiny_cfg


@pytest.mark.parametrize("kw, msg", [
    (dict(clip_threshold=-0.01), "clip_threshold"),
    (dict(batch_size=65, num_workers=2), "not divisible"),
    (dict(model="resnet9000"), "unknown model"),
    (dict(clipping="sometimes"), "clipping must be"),
    (dict(precision="fp8"), "precision"),
    (dict(augment_strength=1.5), "augment_strength"),
])
def test_invalid_config_fails_at_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_cfg(**kw)


def test_no_clipping_carries_no_threshold():
    cfg = tiny_cfg(clipping="none", clip_threshold=0.05)
    assert cfg.clip_threshold is None and cfg.lambda_label == "none" and "clip_threshold" not in cfg.flat() \
        and cfg.flat()["lambda"] == "none"
    assert tiny_cfg(clipping="agc", clip_threshold=0.04).lambda_label == "0.04"


def test_train_command_line(tmp_path, tiny_data, capsys):
    from studies import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):  # --help explains every flag; λ is --lambda on the command line
        assert ("--lambda" if f.name == "clip_threshold" else "--" + f.name.replace("_", "-")) in help_text
    assert "--clip-threshold" not in help_text and "crash" not in help_text  # one spelling; no test hooks

    with pytest.raises(SystemExit):
        train.main(["--clipping", "agc", "--lambda", "-1"])
    assert "--lambda (λ for AGC) must be > 0, got -1.0" in capsys.readouterr().err  # named by its flag

    rc = train.main(["--in-process", "--dataset", tiny_data, "--model-overrides", '{"width": 8, "depth": 1}',
                     "--batch-size", "64", "--max-steps", "8", "--lambda", "0.02",
                     "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--experiment", "cli"])
    out = capsys.readouterr().out
    assert rc == 0 and "status: completed" in out and "epoch 1/1" in out
    assert f"ui --app-name nfnet-lab --workers 1 --backend-store-uri sqlite:///{tmp_path}/m.db" in out


FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)  # float and float | None
                if float in (tp := typing.get_type_hints(TrainConfig)[f.name], *typing.get_args(tp))]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_field_refuses_nan_and_infinity(name, value):
    from studies.training.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_cfg(**{name: value})
    assert str(e.value) == f"invalid TrainConfig: {name} must be a finite number, got {value}"
    assert e.value.field == name and "\n" not in str(e.value)


def test_float_fields_are_all_checked():
    assert {"base_lr", "momentum", "weight_decay", "warmup_epochs", "epochs", "gpus_per_worker",
            "cpus_per_worker", "clip_threshold", "checkpoint_every_minutes", "divergence_factor"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("kw, text", [
    (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
    (dict(momentum=-0.1), "momentum must be in [0, 1), got -0.1"),
    (dict(momentum=0.0, nesterov=True),
     "nesterov needs a momentum > 0, got momentum 0.0; turn nesterov off or use a momentum in (0, 1)"),
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0, got -0.0001"),
    (dict(epochs=0.0), "epochs must be > 0, got 0.0"),  # with max_steps too: a 0 is a mistake, never a setting
    (dict(epochs=0.0, max_steps=None), "epochs must be > 0, got 0.0"),
])
def test_optimizer_and_length_settings_are_refused_out_of_range(kw, text):
    with pytest.raises(ValueError) as e:
        tiny_cfg(**kw)
    assert str(e.value) == f"invalid TrainConfig: {text}"


def test_plain_momentum_without_nesterov_is_accepted():
    assert tiny_cfg(momentum=0.0, nesterov=False).momentum == 0.0 and tiny_cfg(weight_decay=0.0).weight_decay == 0


def test_train_refuses_an_infinite_learning_rate(capsys):
    from studies import train

    with pytest.raises(SystemExit) as e:
        train.main(["--base-lr", "inf"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split(" error: ", 1)[1] == \
        "--base-lr must be a finite number, got inf"


def test_the_fingerprint_hashes_what_decides_the_numbers_normalised():
    # issue 21, item 5: 2 and 2.0 are one config (the resume check already called them equal)
    assert TrainConfig(epochs=2).fingerprint() == TrainConfig(epochs=2.0).fingerprint()
    assert TrainConfig(model_overrides={"width": 8}).fingerprint() == \
        TrainConfig(model_overrides={"width": 8.0}).fingerprint()
    # where and how safely it runs is no part of it
    base = TrainConfig().fingerprint()
    for placement in (dict(data_root="/elsewhere"), dict(cpus_per_worker=2.0), dict(gpus_per_worker=0.25),
                      dict(max_failures=3), dict(checkpoint_every_epochs=0), dict(checkpoint_every_minutes=5.0)):
        assert TrainConfig(**placement).fingerprint() == base, placement
    # what changes the numbers is (the streaming loader visits the images in another order than the resident one)
    for numeric in (dict(base_lr=0.2), dict(seed=1), dict(loader="streaming"), dict(clip_threshold=0.04),
                    dict(num_workers=2), dict(precision="bf16")):
        assert TrainConfig(**numeric).fingerprint() != base, numeric
    # an unset (None) field is left out, so a new field that defaults to None keeps every key
    ident = TrainConfig(image_size=None, max_steps=None).identity()
    assert "image_size" not in ident and "max_steps" not in ident and ident["epochs"] == 5

"""TrainConfig: validated on construction, each field's bounds and help in one place; the flags."""

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
    assert cfg.clip_threshold is None and cfg.lambda_label == "none" and "clip_threshold" not in cfg.flat()
    assert tiny_cfg(clipping="agc", clip_threshold=0.04).lambda_label == "0.04"


def test_train_command_line(tmp_path, tiny_data, capsys):
    import dataclasses

    from studies import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):  # --help explains every flag; λ is --lambda on the command line
        assert ("--lambda" if f.name == "clip_threshold" else "--" + f.name.replace("_", "-")) in help_text
    assert "--clip-threshold" not in help_text and "crash" not in help_text  # one spelling; no test hooks

    with pytest.raises(SystemExit):
        train.main(["--clipping", "agc", "--lambda", "-1"])
    assert "clip_threshold" in capsys.readouterr().err

    rc = train.main(["--in-process", "--dataset", tiny_data, "--model-overrides", '{"width": 8, "depth": 1}',
                     "--batch-size", "64", "--max-steps", "8", "--lambda", "0.02",
                     "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--experiment", "cli"])
    out = capsys.readouterr().out
    assert rc == 0 and "status: completed" in out and "epoch 1/1" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/m.db" in out

import pytest

from dpolab.config import TrainConfig, load_config, parse_overrides
from dpolab.errors import ConfigError


def test_yaml_and_overrides_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-gpt2\nlearning_rate: 1.0e-4\nreport_to: [mlflow]\n")
    config = load_config(path, parse_overrides(["--beta", "0.25", "--loss-type=ipo", "--max_steps", "7",
                                               "--eval-steps", "null", "--skip-bad-rows", "true"]))
    assert config.learning_rate == 1e-4
    assert config.beta == 0.25 and config.loss_type == "ipo" and config.max_steps == 7
    assert config.eval_steps is None and config.skip_bad_rows is True
    assert config.report_to == ["mlflow"]


def test_unknown_key_fails_with_the_key_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config(path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("beta", "-1", "beta must be > 0"),
    ("loss_type", "kto", "loss_type must be one of"),
    ("max_prompt_length", "600", "max_prompt_length .* must be smaller than max_length"),
    ("per_device_train_batch_size", "two", "per_device_train_batch_size must be int"),
    ("report_to", "neptune", "unknown tracker 'neptune'"),
    ("label_smoothing", "0.5", r"label_smoothing must be in \[0, 0.5\)"),
])
def test_bad_values_fail_at_start(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_every_field_is_documented():
    import dataclasses

    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help", "").startswith("("), field.name


def test_override_without_value_is_an_error():
    with pytest.raises(ConfigError, match="--beta needs a value"):
        parse_overrides(["--beta"])

import ast
import dataclasses
import re
import types
import typing
from typing import Any

import pytest

from dpolab.cli import main
from dpolab.config import TrainConfig, load_config
from dpolab.errors import ConfigError


def test_yaml_values_and_command_line_overrides(tmp_path, monkeypatch, capsys):
    import dpolab.dpo.trainer as trainer

    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-gpt2\nlearning_rate: 5e-5\nreport_to: [mlflow]\nbeta: 0.5\nmax_steps: 3\n")
    seen = []
    monkeypatch.setattr(trainer, "train", lambda config, output_dir, resume: seen.append(config) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stop right after the config was built
        main(["train", "--config", str(path), "--beta", "0.25", "--loss-type=ipo", "--max_steps", "7",
              "--skip-bad-rows", "--group-by-length", "false", "--report-to", "wandb,tensorboard"])
    (config,) = seen
    assert config.learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string: still a float here
    assert config.beta == 0.25 and config.loss_type == "ipo" and config.max_steps == 7  # command line wins
    assert config.skip_bad_rows is True and config.group_by_length is False
    assert config.report_to == ["wandb", "tensorboard"]


def test_help_lists_every_field_with_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # without the line wrapping
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name}" in text, field.name
        assert "".join(field.metadata["help"].split()) in text, field.name


@pytest.mark.parametrize(("argv", "message"), [
    (["--bta", "0.2"], "command line: unknown key 'bta' (did you mean 'beta'?)"),
    (["--beta", "x"], "argument --beta: invalid float value: 'x'"),
    (["--num-train-epochs", "true"], "invalid float value: 'true'"),
    (["--loss-type", "sigmoid,kto"], "loss_type: unknown loss 'kto'"),
    (["--f-divergence-type", "kl"], "invalid choice: 'kl'"),
])
def test_bad_command_line_is_one_line_and_exit_2(argv, message, capsys):
    try:
        code = main(["train", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpolab train: error: ") and message in err, err


def test_unknown_key_fails_with_the_key_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config(path)


@pytest.mark.parametrize(("yaml_line", "message"), [
    ("num_train_epochs: true", "num_train_epochs must be float, got True"),  # a bool is not a number
    ("max_steps: 2.5", "max_steps must be int, got 2.5"),
    ("per_device_train_batch_size: two", "per_device_train_batch_size must be int"),
    ("skip_bad_rows: 1", "skip_bad_rows must be bool, got 1"),
    ("report_to: [1]", "report_to must be a list of strings"),
])
def test_yaml_values_of_the_wrong_type_fail_naming_file_and_field(tmp_path, yaml_line, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_line + "\n")
    with pytest.raises(ConfigError, match=rf"c.yaml: {message}"):
        load_config(path)


@pytest.mark.parametrize(("values", "message"), [
    ({"beta": -1.0}, "beta must be > 0"),
    ({"max_prompt_length": 600}, "max_prompt_length .* must be smaller than max_length"),
    ({"report_to": ["neptune"]}, "unknown tracker 'neptune'"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"loss_type": "kto"}, "loss_type: unknown loss 'kto'"),
    ({"loss_weights": "1,x"}, "loss_weights must be comma-separated numbers"),
    ({"loss_weights": "1,0.5"}, "loss_weights has 2 weights for 1 loss types"),
    ({"loss_type": "sigmoid,sft", "rpo_alpha": 0.5}, "rpo_alpha is a shorthand for an 'sft' term"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing needs a loss that reads it"),
    ({"loss_type": "exo_pair"}, "'exo_pair' needs label_smoothing > 0"),
    ({"loss_type": "sigmoid,bco_pair", "f_divergence_type": "js_divergence"},
     "f_divergence_type 'js_divergence' needs loss types among"),
    ({"loss_type": "aot", "use_weighting": True}, "use_weighting .* does not apply to 'aot'"),
    ({"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
    ({"loss_type": "ipo", "rdpo_alpha": 0.1}, "rdpo_alpha .* loss_type needs 'sigmoid'"),
])
def test_bad_values_fail_at_start(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)


def test_loss_type_one_or_several_from_yaml_list_string_or_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1]\n")
    config = load_config(path)
    assert (config.loss_type, config.loss_weights) == ("sigmoid,bco_pair,sft", "0.8,0.2,1")  # one string: a
    assert config.loss_terms == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]  # sweep can choose it
    assert load_config(None, {"loss_type": "ipo, sft"}).loss_terms == [("ipo", 1.0), ("sft", 1.0)]
    # --rpo-alpha stays a shorthand for an sft term of that weight
    assert load_config(None, {"rpo_alpha": 0.5}).loss_terms == [("sigmoid", 1.0), ("sft", 0.5)]
    assert load_config(None, {"loss_type": "simpo"}).reference_free
    assert load_config(None, {"loss_type": "sft"}).reference_free
    assert not load_config(None, {"loss_type": "simpo,sigmoid"}).reference_free


def _type_name(annotation: Any) -> str:
    """How a field's help spells its type: ``int | None``, ``list[str]``; a Literal of choices is ``str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(sorted({type(a).__name__ for a in args}))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return "None" if annotation is type(None) else annotation.__name__


def test_every_field_is_documented():
    """Each help opens with "(type, default): meaning", and that type and default are the field's."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        match = re.match(r"\((?P<type>[^,]+), (?P<default>.+?)\): \S", field.metadata.get("help", ""))
        assert match, f"{field.name}: help does not start with '(type, default): '"
        assert match["type"] == _type_name(hints[field.name]), field.name
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        documented = ast.literal_eval(match["default"])
        assert documented == default and type(documented) is type(default), (field.name, documented, default)

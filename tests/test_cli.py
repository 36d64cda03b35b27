"""The `taxonclip` command without MLflow: data, models, bad parameters, every option described
by `--help` (with its choices and default), and true/false parameters as flags."""

from __future__ import annotations

import argparse

import pytest

from taxonclip import config as cfg
from taxonclip.cli import build_parser, main
from taxonclip.params import (COMPARE_PARAMS, EVAL_PARAMS, TRAIN_PARAMS, description, field_type,
                              flat_fields)


def test_data_synth_then_check(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "set"), "--taxa", "2", "--genera", "2",
                 "--species", "2", "--images", "4", "--size", "32"]) == 0
    assert main(["data", "check", str(tmp_path / "set")]) == 0
    printed = capsys.readouterr().out
    assert "rows: 32" in printed and "species: 8, genera: 4, taxa: 2" in printed


def test_data_check_with_a_class_fraction_reports_the_species_eval_scores(tmp_path, capsys):
    """`--class-fraction` is a parameter of data check: what it prints must be of the subset
    that eval and train of that fraction use, not of the whole manifest."""
    from taxonclip.data.manifest import read_manifest
    from taxonclip.data.splits import select_classes

    main(["data", "synth", "--out", str(tmp_path / "set"), "--taxa", "2", "--genera", "2",
          "--species", "5", "--images", "4", "--size", "32"])
    capsys.readouterr()
    kept = select_classes(read_manifest(tmp_path / "set").table, 0.3, seed=3)

    assert main(["data", "check", str(tmp_path / "set"), "--class-fraction", "0.3", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert len(kept) == 6
    assert "class_fraction 0.3 (seed 3) keeps 6 of 20 species, 24 of 80 rows" in printed
    assert "species: 6 classes, 24 rows" in printed


def test_data_check_bad_column_exits_1_without_traceback(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,name\na.jpg,Danaus plexippus\n")
    assert main(["data", "check", str(manifest)]) == 1
    error = capsys.readouterr().err
    assert "m.csv" in error and "Traceback" not in error


def test_data_check_with_captions_names_the_species_without_one(leeds, tmp_path, capsys):
    guide = (leeds / "descriptions.csv").read_text().splitlines()
    partial = tmp_path / "guide.csv"
    partial.write_text("\n".join(line for line in guide if not line.startswith("Danaus plexippus")))
    assert main(["data", "check", str(leeds), "--captions", str(leeds / "descriptions.csv")]) == 0
    assert main(["data", "check", str(leeds), "--captions", str(partial)]) == 1
    error = capsys.readouterr().err
    assert "guide.csv: no caption for 1 of 10 names in the manifest: Danaus plexippus" in error
    assert "Traceback" not in error


def test_models_lists_every_architecture(capsys):
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    for name in ("ViT-B/32", "ViT-L/14@336px", "unicom:ViT-B/16", "tiny"):
        assert name in printed


def test_unknown_parameter_value_is_named(capsys):
    assert main(["eval", "--embedding", "pixels"]) == 1
    assert "embedding" in capsys.readouterr().err


def test_sweep_overrides_come_as_flags_or_one_string():
    from taxonclip.cli import _overrides, _split_pairs

    args = build_parser().parse_args(["sweep", "--overrides", "model=tiny,epochs=2", "-P", "lr=0.1"])
    assert _overrides(args.overrides + _split_pairs(args.override_list)) == {
        "lr": "0.1", "model": "tiny", "epochs": "2"}
    assert _split_pairs("none") == []


def test_train_of_an_uncached_model_offline_names_the_file(offline, specimens, capsys):
    assert main(["train", "--model", "ViT-L/14@336px", "--data", str(specimens),
                 "--batch_size", "16"]) == 1
    error = capsys.readouterr().err
    assert "ViT-L-14-336px.pt" in error and "weights=" in error and "Traceback" not in error


def test_malformed_number_is_named(capsys):
    assert main(["train", "--epochs", "two"]) == 1
    assert "parameter 'epochs': 'two' is not an integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- --help

# the commands with typed parameters, with their config, their parameters and the job they run
TYPED_COMMANDS = {"eval": (cfg.EvalConfig, EVAL_PARAMS, "evaluate"),
                  "train": (cfg.TrainConfig, TRAIN_PARAMS, "train"),
                  "compare": (cfg.CompareConfig, COMPARE_PARAMS, "compare")}


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) of `parser` and of every command below it."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, child in action.choices.items():
                yield from _parsers(child, (*words, word))


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something (`data check`, `train`, ...) and its parser."""
    return {" ".join(words): parser for words, parser in _parsers(build_parser())
            if words and not any(isinstance(action, argparse._SubParsersAction)
                                 for action in parser._actions)}


def _help_of(argv: list[str], capsys) -> str:
    """What `taxonclip <argv> --help` prints, its lines joined (argparse wraps them)."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_every_command_of_the_issue_has_a_parser():
    assert set(_commands()) == {"eval", "train", "sweep", "compare", "data check", "data prepare",
                                "data synth", "models", "sync", "caption"}


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_has_a_one_line_description_and_its_default(command):
    for action in _commands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and "\n" not in action.help, f"{command} {name}: no one-line description"
        if action.option_strings:  # an option says its default, or that it is required
            assert "(default: " in action.help or "(required)" in action.help, f"{command} {name}"


@pytest.mark.parametrize("command", sorted(TYPED_COMMANDS))
def test_help_names_every_parameter_with_its_choices_and_default(command, capsys):
    cls, mapping, _ = TYPED_COMMANDS[command]
    printed = _help_of([command], capsys)
    defaults = flat_fields(cls())
    for name, path in mapping.items():
        text, choices = description(cls, path)
        assert f"--{name}" in printed
        assert " ".join(text.split()) in printed, name
        if choices:
            assert f"one of {', '.join(choices)}" in printed, name
        default = defaults[path]
        shown = str(default).lower() if default is None or isinstance(default, bool) else default
        assert f"(default: {shown})" in printed, name


def test_train_help_lists_the_embeddings_labels_and_decoders(capsys):
    printed = _help_of(["train"], capsys)
    assert "one of visual, text, avg, concat, gallery_avg (default: visual)" in printed
    assert "one of workers, device (default: workers)" in printed
    assert f"one of {', '.join(cfg.LABELS)} (default: species)" in printed
    assert "--compile [true|false]" in printed
    assert "learning-rate multiplier of the PartialFC class centres" in printed


# ------------------------------------------------------------------------------ boolean flags


def _bool_params() -> list[tuple[str, str]]:
    """(command, parameter) of every bool field the typed commands take, found by type."""
    return [(command, name) for command, (cls, mapping, _) in TYPED_COMMANDS.items()
            for name, path in mapping.items() if field_type(cls, path) is bool]


def _config_of(argv: list[str], monkeypatch):
    """The typed config that `taxonclip <argv>` would run its job with (the job is not run)."""
    from taxonclip import jobs

    received = []
    monkeypatch.setattr(jobs, TYPED_COMMANDS[argv[0]][2],
                        lambda config: received.append(config) or 0)
    assert main(argv) == 0
    return received[0]


def test_the_bool_parameters_are_found_by_type():
    found = set(_bool_params())
    assert {("train", "compile"), ("eval", "zero_shot"), ("compare", "promote")} <= found


@pytest.mark.parametrize("command, name", _bool_params())
@pytest.mark.parametrize("spelling, expected", [("{flag}", True), ("{flag} true", True),
                                                ("{flag} false", False), ("{flag}=false", False),
                                                ("{flag}=true", True)])
def test_a_bool_parameter_is_a_flag_that_takes_a_value(command, name, spelling, expected,
                                                       monkeypatch):
    _, mapping, _ = TYPED_COMMANDS[command]
    config = _config_of([command, *spelling.format(flag=f"--{name}").split()], monkeypatch)
    assert flat_fields(config)[mapping[name]] is expected


def test_a_flag_alone_leaves_the_next_option_its_value(monkeypatch):
    config = _config_of(["train", "--compile", "--epochs", "2"], monkeypatch)
    assert (config.compile, config.epochs) == (True, 2)
    config = _config_of(["train", "--epochs", "2", "--compile"], monkeypatch)
    assert (config.compile, config.epochs) == (True, 2)
    assert _config_of(["train"], monkeypatch).compile is False


def test_mlproject_spelling_of_the_bools_still_parses(monkeypatch):
    assert _config_of(["eval", "--zero_shot", "false"], monkeypatch).zero_shot is False
    assert _config_of(["compare", "--promote", "false", "--top", "3"], monkeypatch).promote is False


def test_a_bool_parameter_refuses_another_word_naming_itself(capsys):
    assert main(["train", "--compile", "maybe"]) == 1
    error = capsys.readouterr().err
    assert "parameter 'compile': 'maybe' is not true or false" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error

"""The `taxonclip` command without MLflow: data, models, bad parameters."""

from __future__ import annotations

from taxonclip.cli import main


def test_data_synth_then_check(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "set"), "--taxa", "2", "--genera", "2",
                 "--species", "2", "--images", "4", "--size", "32"]) == 0
    assert main(["data", "check", str(tmp_path / "set")]) == 0
    printed = capsys.readouterr().out
    assert "rows: 32" in printed and "species: 8, genera: 4, taxa: 2" in printed


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
    from taxonclip.cli import _overrides, _split_pairs, build_parser

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

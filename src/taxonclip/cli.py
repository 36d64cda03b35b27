"""The `taxonclip` command: data, models, eval, train, caption, sweep, compare.

Parameters have the names of the MLproject entry points (`--batch_size` or `--batch-size`); a
parameter not given keeps the default of the typed config, and `taxonclip <command> --help`
shows the description that config declares for each. A true/false parameter is a flag that also
takes a value (`--compile` alone, or `--compile true`). Input the user can fix ends in one
message on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from taxonclip import config as cfg
from taxonclip.errors import TaxonclipError, UsageError
from taxonclip.launch.options import LaunchConfig
from taxonclip.launch.submit import add_launch_options
from taxonclip.params import (CAPTION_PARAMS, COMPARE_PARAMS, DATA_PARAMS, EVAL_PARAMS,
                              PREPARE_PARAMS, SWEEP_PARAMS, TRAIN_PARAMS, description, field_type,
                              flat_fields, from_params)

# the formats whose reader writes a fixture (data.readers.registry; tests/test_readers.py checks)
SYNTH_FORMATS = ("vlm4bio", "bioscan5m", "treeoflife")
# `data synth`'s counts and sizes (those of data.synthetic.generate): name -> (default, description)
SYNTH_OPTIONS = {
    "seed": (0, "seed of the generated taxonomy and images"),
    "taxa": (3, "taxa, one body plan each (fish, bird, butterfly, ...)"),
    "genera": (4, "genera per taxa"),
    "species": (5, "species per genus"),
    "images": (30, "images per species"),
    "size": (64, "side of the square images in pixels"),
}

# `data check`: the data's parameters, and the processes that decode every image
CHECK_PARAMS = {**DATA_PARAMS, "workers": "workers"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are UsageErrors, so that a command line that does not
    parse ends like any other bad input: one message, exit status 1 (argparse would print the
    usage and exit 2)."""

    def error(self, message: str):
        # argparse reads a value such as -inf or -1e-5 as an option, and then misses the value
        hint = (" (write a value that starts with '-' as --name=VALUE)"
                if message.endswith("expected one argument") else "")
        raise UsageError(self.prog, f"{message}{hint}; `{self.prog} --help` lists the parameters")


def _add_params(parser: argparse.ArgumentParser, mapping: Mapping[str, str], cls: type) -> None:
    """One option per entry-point parameter of `mapping`, described by its field of `cls`. Values
    stay strings (None where not given) for `params.from_params` to parse, so that bad input is
    refused there, by name; a bool is a flag that also takes a value: `--compile` alone is true,
    and `--compile false`, as MLproject passes it, still works."""
    defaults = flat_fields(cls())
    for name, path in mapping.items():
        flags = {f"--{name}", f"--{name.replace('_', '-')}"}
        if field_type(cls, path) is bool:
            # nargs="?" takes the next word only if it is not an option: `--compile --epochs 2`
            kind: dict[str, Any] = {"nargs": "?", "const": "true", "metavar": "true|false"}
        else:
            kind = {"metavar": "VALUE"}
        parser.add_argument(*sorted(flags), dest=name, default=None,
                            help=_option_help(*description(cls, path), defaults[path]), **kind)


def _option_help(description: str, choices: tuple[str, ...], default: Any) -> str:
    """A parameter's line of `--help`: its description, its fixed set of values, its default."""
    one_of = f"; one of {', '.join(choices)}" if choices else ""
    return _literal(f"{description}{one_of} (default: {_spelled(default)})")


def _spelled(value: Any) -> str:
    """A default as the command line writes it: none, true, false, 1e-05."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _literal(text: str) -> str:
    """`text` as argparse prints it: it %-formats help strings, so a `%` is written `%%`."""
    return text.replace("%", "%%")


def _field_help(cls: type, path: str) -> str:
    """The description of a config field, for an argument that is not an entry-point parameter."""
    return _literal(description(cls, path)[0])


def _given(args: argparse.Namespace, mapping: Mapping[str, str]) -> dict[str, str]:
    return {name: getattr(args, name) for name in mapping
            if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `taxonclip` command."""
    parser = _Parser(prog="taxonclip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate or check a dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write generated specimens (VLM4Bio layout, "
                                                   "or a small BIOSCAN-5M-format set)")
    synth.add_argument("--out", required=True, help="folder to write, new or empty (required)")
    synth.add_argument("--format", choices=SYNTH_FORMATS, default=SYNTH_FORMATS[0],
                       help=f"vlm4bio: taxa x genera x species x images in the VLM4Bio layout; "
                            f"bioscan5m (the owners' layout and 23 columns), treeoflife "
                            f"(WebDataset shards in TreeOfLife-10M's key layout): small sets of "
                            f"fixed shape, which take only --seed and --size; one of "
                            f"{', '.join(SYNTH_FORMATS)} "
                            f"(default: {SYNTH_FORMATS[0]})")
    for name, (default, text) in SYNTH_OPTIONS.items():
        synth.add_argument(f"--{name}", type=int, default=default, metavar="N",
                           help=f"{text} (default: {default})")
    check = data_commands.add_parser("check", help="validate a manifest and print its summary")
    check.add_argument("path", help=_field_help(cfg.DataConfig, "data"))
    _add_params(check, {k: v for k, v in CHECK_PARAMS.items() if k != "data"}, cfg.EvalConfig)

    prepare = data_commands.add_parser(
        "prepare", help="write a dataset as WebDataset shards of images resized once (train and "
                        "eval then read the folder as data)")
    prepare.add_argument("path", help=_field_help(cfg.DataConfig, "data"))
    prepare.add_argument("--out", required=True,
                         help=f"{_field_help(cfg.PrepareConfig, 'out')} (required)")
    _add_params(prepare, {k: v for k, v in PREPARE_PARAMS.items() if k != "data"},
                cfg.PrepareConfig)

    commands.add_parser("models", help="list the model names")

    sync = commands.add_parser("sync", help="send a run's spool to the tracking server once it is back")
    sync.add_argument("folder", help="the spool folder a run named when the server was unreachable")

    evaluate = commands.add_parser("eval", help="evaluate a model (nearest-neighbour metrics)")
    _add_params(evaluate, EVAL_PARAMS, cfg.EvalConfig)
    train = commands.add_parser("train", help="fine-tune a model, then evaluate it")
    _add_params(train, TRAIN_PARAMS, cfg.TrainConfig)

    caption = commands.add_parser("caption", help="caption every image with an "
                                                  "image-text-to-text model, per image")
    _add_params(caption, CAPTION_PARAMS, cfg.CaptionConfig)

    sweep = commands.add_parser("sweep", help="run an Optuna study of training runs")
    _add_params(sweep, SWEEP_PARAMS, cfg.SweepConfig)
    sweep.add_argument("-P", "--param", dest="overrides", action="append", default=[],
                       metavar="NAME=VALUE", help="override a fixed training parameter of the "
                                                  "sweep file; repeatable (default: none)")
    sweep.add_argument("--overrides", dest="override_list", default=None, metavar="N=V,N=V",
                       help="the same overrides as one comma-separated string, "
                            "model=ViT-B/32,epochs=32, as MLproject passes them (default: none)")
    # shown by --help; main() takes them off the command line before this parser sees it
    for name, launchable in (("eval", evaluate), ("train", train), ("caption", caption),
                             ("sweep", sweep)):
        add_launch_options(launchable.add_argument_group("where it runs"), name)

    _add_params(commands.add_parser("compare", help="rank runs and write a report"),
                COMPARE_PARAMS, cfg.CompareConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    from taxonclip.launch.submit import split_launch_options

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launch, argv = split_launch_options(argv)
        args = _parse(argv)
    except UsageError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 1
    except TaxonclipError as exc:  # a launch option
        print(f"taxonclip {argv[0]}: error: {_message(exc)}", file=sys.stderr)
        return 1
    try:
        if launch is not None and launch != LaunchConfig():
            return _launched(launch, argv, args)
        return _dispatch(args)
    except TaxonclipError as exc:
        print(f"taxonclip {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 1


def _launched(launch: LaunchConfig, argv: list[str], args: argparse.Namespace) -> int:
    """Run the command through its launcher, its parameters checked (its typed config built)
    here first, so that bad input is refused before anything is submitted."""
    from taxonclip.launch.submit import run_command

    return run_command(launch, argv, _typed_config(args), lambda: _dispatch(args))


def _typed_config(args: argparse.Namespace):
    """The typed config of a launchable command (None where this module builds none)."""
    if args.command == "eval":
        return from_params(cfg.EvalConfig, _given(args, EVAL_PARAMS), EVAL_PARAMS)
    if args.command == "train":
        return from_params(cfg.TrainConfig, _given(args, TRAIN_PARAMS), TRAIN_PARAMS)
    if args.command == "caption":
        return from_params(cfg.CaptionConfig, _given(args, CAPTION_PARAMS),
                               CAPTION_PARAMS)
    if args.command == "sweep":
        pairs = args.overrides + _split_pairs(args.override_list)
        params = {**_given(args, SWEEP_PARAMS), "overrides": _overrides(pairs)}
        return from_params(cfg.SweepConfig, params,
                               {**SWEEP_PARAMS, "overrides": "overrides"})
    return None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; a parameter the command does not take is a UsageError naming
    the command (argparse itself would name only `taxonclip`)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        words = ("taxonclip", args.command, getattr(args, "data_command", None))
        prog = " ".join(word for word in words if word)
        raise UsageError(prog, f"unknown parameter(s) {' '.join(unknown)}; `{prog} --help` lists "
                               f"the parameters")
    return args


def _message(exc: TaxonclipError) -> str:
    """The error's own message: an error raised in a DataLoader worker comes back with the
    worker's traceback folded into it, of which only the last line is the message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def _dispatch(args: argparse.Namespace) -> int:
    from taxonclip import jobs

    if args.command == "data" and args.data_command == "synth" and args.format != "vlm4bio":
        return jobs.synth_fixture(args.format, args.out, seed=args.seed, size=args.size)
    if args.command == "data" and args.data_command == "synth":
        return jobs.synth(args.out, seed=args.seed, taxa=args.taxa, genera=args.genera,
                          species=args.species, images=args.images, size=args.size)
    if args.command == "data" and args.data_command == "prepare":
        params = {**_given(args, PREPARE_PARAMS), "data": args.path, "out": args.out}
        if "size" in params:
            params["size"] = jobs.prepare_size(params["size"])
        return jobs.prepare(from_params(cfg.PrepareConfig, params,
                                            {**PREPARE_PARAMS, "out": "out"}))
    if args.command == "data":
        params = {**_given(args, CHECK_PARAMS), "data": args.path}
        config = from_params(cfg.EvalConfig, params, EVAL_PARAMS)
        return jobs.check(config.data, workers=config.workers)
    if args.command == "models":
        return jobs.models()
    if args.command == "sync":
        return jobs.sync(args.folder)
    launchable = {"eval": jobs.evaluate, "train": jobs.train, "caption": jobs.caption,
                  "sweep": jobs.sweep}
    if args.command in launchable:
        return launchable[args.command](_typed_config(args))
    return jobs.compare(from_params(cfg.CompareConfig, _given(args, COMPARE_PARAMS),
                                        COMPARE_PARAMS))


def _split_pairs(text: str | None) -> list[str]:
    if text is None or text.strip().lower() in ("", "none"):
        return []
    return [pair for pair in text.split(",") if pair.strip()]


def _overrides(pairs: list[str]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise TaxonclipError(f"override {pair!r} is not NAME=VALUE")
        parsed[name.strip()] = value
    return parsed


if __name__ == "__main__":
    raise SystemExit(main())

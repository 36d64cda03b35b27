"""Check the commands of bench/device_check.sh without running them: each benchmark script
exists and its argument parser accepts the step's arguments; a pytest command collects its tests.

    python bench/check_commands.py < commands.txt      # one command a line, as a shell splits it

Every script is loaded as a module (its `main` is not run) and its `parse_args` called with the
step's arguments, all in this one process. Prints `ok` or the failure for each line, and exits 1
when any fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shlex
import sys
from pathlib import Path


def check(argv: list[str]) -> str | None:
    """Why `argv` (python SCRIPT ARGS..., or python -m pytest ARGS...) would not start, or None."""
    if len(argv) >= 3 and argv[1:3] == ["-m", "pytest"]:
        return _check_pytest(argv[3:])
    if len(argv) < 2 or not argv[1].endswith(".py"):
        return f"not a python script or pytest command: {shlex.join(argv)}"
    script = Path(argv[1])
    if not script.is_file():
        return f"{script} does not exist"
    try:
        module = _load(script)
    except Exception as error:  # noqa: BLE001 - any failure to import is the answer
        return f"{script} does not import: {type(error).__name__}: {error}"
    if not hasattr(module, "parse_args"):
        return f"{script} has no parse_args to check its arguments with"
    saved, stderr = sys.argv, io.StringIO()
    sys.argv = [str(script), *argv[2:]]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            _parse(module, argv[2:])
    except SystemExit as stop:
        if stop.code not in (0, None):
            return f"{script} refuses its arguments: {stderr.getvalue().strip().splitlines()[-1:]}"
    finally:
        sys.argv = saved
    return None


def _parse(module, arguments: list[str]) -> None:
    """The script's parse_args, with the arguments as its parameter or in sys.argv."""
    try:
        module.parse_args(arguments)
    except TypeError:  # a parse_args() that reads sys.argv
        module.parse_args()


def _load(script: Path):
    name = f"checked_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_pytest(arguments: list[str]) -> str | None:
    import pytest

    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *arguments])
    if status != 0:
        return f"pytest {shlex.join(arguments)} collects nothing or fails ({status}): " \
               f"{out.getvalue().strip().splitlines()[-1:]}"
    return None


def main() -> None:
    failed = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        problem = check(shlex.split(line))
        failed += problem is not None
        print(f"{'ok' if problem is None else 'FAILED'}: {line.strip()}" + ("" if problem is None else f"\n  {problem}"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

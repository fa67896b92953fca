"""The `workbench` command.

Commands live in `workbench/commands/*.py`; each module exposes `COMMANDS`, a list of
`Command(group, name, help, add_arguments, run)`. They are discovered here, so adding a
command never means editing this file. A `WorkbenchError` becomes `error: …` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from workbench.commands import Command
from workbench.errors import ExtraMissing, WorkbenchError
from workbench.validate import bounded, number, show, whole

GROUP_HELP = {
    "topology": "build, inspect, validate and discover cluster topologies",
    "simulate": "simulate transfers, collectives, training steps and serving",
    "search": "search parallel plans",
    "bench": "benchmarks of the workbench itself",
    "run": "run a job for real on this machine or a cluster",
    "emulate": "emulate a multi-host cluster with network namespaces",
    "doctor": "report what this machine can use and what to fix",
    "demo": "run the main job and write the HTML report",
    "deploy": "write Kubernetes or Docker Swarm files that run a planned job",
    "plan": "place a model's layers on a (mixed-GPU) cluster",
}


def _discover() -> list[Command]:
    import workbench.commands as pkg

    found: list[Command] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"workbench.commands.{info.name}")
        found.extend(getattr(module, "COMMANDS", []))
    return found


def _whole(text: str) -> int:
    """`type=int` of every option: ASCII digits, 0..2^31 (no negative counts, full-width digits or huge values)."""
    try:
        return whole(text, "value", 0, 2**31)
    except WorkbenchError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (ASCII digits), got {show(text)}") from None


def _number(text: str) -> float:
    """`type=float` of every option: a finite number >= 0 (no nan, inf, 1e400 or negative values)."""
    try:
        return number(text, "value", 0.0, 1e12, lo_open=False)
    except WorkbenchError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {show(text)}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with strict numbers (`type=int`/`float` mean `_whole`/`_number`) and bounded error lines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", int, _whole)
        self.register("type", float, _number)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {bounded(message, 500)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", metavar="COMMAND")
    groups.required = True
    subs: dict[str, argparse._SubParsersAction] = {}
    for cmd in _discover():
        if cmd.name is None:  # a group that is itself the command (e.g. `workbench doctor`)
            p = groups.add_parser(cmd.group, help=cmd.help, description=cmd.help)
            cmd.add_arguments(p)
            p.set_defaults(_run=cmd.run)
            continue
        if cmd.group not in subs:
            gp = groups.add_parser(cmd.group, help=GROUP_HELP.get(cmd.group, cmd.group))
            subs[cmd.group] = gp.add_subparsers(dest="command", metavar="SUBCOMMAND")
            subs[cmd.group].required = True
        p = subs[cmd.group].add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


OUTPUT_FILES = ("trace", "csv", "out", "save_requests")
"""Options naming a file the command writes; checked before any work starts."""
OUTPUT_DIRS: dict[tuple[str | None, str | None], tuple[str, ...]] = {("deploy", "k8s"): ("out",), ("deploy", "swarm"): ("out",), ("bench", "transport"): ("out_dir",), ("convert", None): ("out",)}
"""Options naming a folder the command writes into, per command."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every run's ranks are stopped on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every output path the user gave can be written: its folder exists, is writable, has space."""
    from workbench.io import check_output

    key = (getattr(args, "group", None), getattr(args, "command", None))
    dirs = OUTPUT_DIRS.get(key, ())
    sub = _subparser(parser, args)
    for dest in (*OUTPUT_FILES, *dirs):
        value = getattr(args, dest, None)
        if value is None or (sub is not None and value == sub.get_default(dest)):
            continue  # not given (a default path is the command's own business: it may create its folder)
        check_output(value, "--" + dest.replace("_", "-"), directory=dest in dirs)


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser | None:
    p: argparse.ArgumentParser | None = parser
    for name in (getattr(args, "group", None), getattr(args, "command", None)):
        if p is None or name is None:
            break
        acts = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        p = acts[0].choices.get(name) if acts else p  # type: ignore[union-attr]
    return p


def _stop_runs() -> None:
    """Stop the ranks of any run still going (Ctrl-C, SIGTERM or an error on the way out)."""
    launcher = sys.modules.get("workbench.runner.launcher")
    stop = getattr(launcher, "stop_all_runs", None)
    if stop is not None:
        stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: `error: <one bounded line naming the field>` and exit 2, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        check_outputs(parser, args)
        return int(args._run(args) or 0)
    except _user_errors() as exc:
        _fail(str(exc))
        return 2
    except UnicodeDecodeError as exc:  # a file that is not text, read outside workbench.io
        _fail(f"a file is not UTF-8 text (byte {exc.start}: {exc.reason})")
        return 2
    except OSError as exc:  # a file the command could not read or write (disk full, permissions, …)
        where = f" {show(str(exc.filename), 200)}" if exc.filename else ""
        given = [d for d in (*OUTPUT_FILES, "out_dir") if getattr(args, d, None)]
        flag = next((d for d in given if str(getattr(args, d)) == str(exc.filename)), None)
        if exc.filename is None and len(given) == 1:  # a failed write reports no file name: the one output
            flag = given[0]
        field = f"--{flag.replace('_', '-')}: cannot write" if flag else "cannot read or write"
        _fail(f"{field}{where}: {exc.strerror or type(exc).__name__}")
        return 2
    except KeyboardInterrupt as exc:
        _stop_runs()
        term = isinstance(exc, _Terminated)
        print("\nterminated" if term else "\ninterrupted", file=sys.stderr)
        return 143 if term else 130
    except RecursionError:
        _fail("the input is nested too deeply")
        return 2
    except MemoryError:
        _fail("out of memory: the input asks for more than this machine has")
        return 2
    finally:
        _stop_runs()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _user_errors() -> tuple[type[BaseException], ...]:
    """`WorkbenchError`, `ExtraMissing` and the error bases of `transport` and `kernels` where loaded
    (those packages import nothing of workbench); evaluated when an exception reaches `main`."""
    out: list[type[BaseException]] = [WorkbenchError, ExtraMissing]
    for module, names in (("transport.errors", ("TransportError",)), ("kernels.errors", ("KernelInputError", "ExtraMissing"))):
        m = sys.modules.get(module)
        out += [getattr(m, n) for n in names] if m is not None else []
    return tuple(out)


def _fail(message: str) -> None:
    try:
        print(f"error: {bounded(message)}", file=sys.stderr)
    except OSError:  # stderr itself is gone (closed pipe): nothing more to say
        pass


if __name__ == "__main__":
    sys.exit(main())

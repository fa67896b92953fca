"""The `workbench` command.

Commands live in `workbench/commands/*.py`; each module exposes `COMMANDS`, a list of
`Command(group, name, help, add_arguments, run)`. They are discovered here, so adding a
command never means editing this file. A `WorkbenchError` becomes `error: …` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from workbench.commands import Command
from workbench.errors import ExtraMissing, WorkbenchError

GROUP_HELP = {
    "topology": "build, inspect, validate and discover cluster topologies",
    "simulate": "simulate transfers, collectives and training steps",
    "search": "search parallel plans",
    "bench": "benchmarks of the workbench itself",
    "run": "run a job for real on this machine or a cluster",
    "emulate": "emulate a multi-host cluster with network namespaces",
    "doctor": "report what this machine can use and what to fix",
    "demo": "run the main job and write the HTML report",
    "deploy": "write Kubernetes or Docker Swarm files that run a planned job",
}


def _discover() -> list[Command]:
    import workbench.commands as pkg

    found: list[Command] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"workbench.commands.{info.name}")
        found.extend(getattr(module, "COMMANDS", []))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (WorkbenchError, ExtraMissing, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

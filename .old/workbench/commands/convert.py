"""`workbench convert CHECKPOINT_DIR --placement FILE --out PACKAGE_DIR`: checkpoint → model package."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("--placement", required=True, help="placement file (YAML/JSON) from `workbench plan place --out`")
    p.add_argument("--out", required=True, help="package folder to create")
    p.add_argument("--cluster", help="check the placement against this cluster (default: the one the file names)")
    p.add_argument("--force", action="store_true", help="replace an existing package at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run(args: argparse.Namespace) -> int:
    from workbench.convert.package import convert

    res = convert(args.checkpoint, args.placement, args.out, cluster=args.cluster, force=args.force,
                  progress=False if args.no_progress else None)
    text = (f"package {res['package']}: {res['stages']} stages in {res['files']} files, "
            f"{res['bytes_read'] / 1e9:.3f} GB read, {res['bytes_written'] / 1e9:.3f} GB written in "
            f"{res['seconds']:.2f} s ({res['read_GBps']:.2f} GB/s)")
    emit(res, args.json, text)
    return 0


COMMANDS = [Command("convert", None, "convert a Hugging Face checkpoint into a package laid out by a placement",
                    _args, _run)]

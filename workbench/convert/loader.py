"""Reading a model package: the manifest, and one stage's tensors mapped onto its device.

`load_stage(package, stage, device)` checks the stage file's sha256 against the manifest, loads it
with safetensors straight onto `device` ("cpu", "cuda:0", …), and (by default) turns quantised
weights back into floating point there (codes × per-block `_scale_inv`), so a server gets the
Hugging Face names it expects. `dequantize=False` returns the stored codes and scales instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.convert.package import BLOCK, CONVERTER_VERSION, FORMAT, sha256_file
from workbench.errors import WorkbenchError


def read_manifest(package: str | Path) -> dict[str, Any]:
    """The package's manifest; an error if the folder is not a complete package of a version this reads."""
    p = Path(package)
    mf = p / "manifest.json"
    if not mf.is_file():
        hint = " (an interrupted conversion? run convert again)" if (p.parent / f".{p.name}.partial").exists() else ""
        raise WorkbenchError(f"package: {p}/manifest.json is missing; {p} is not a complete model package{hint}")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"package: {mf} is not valid JSON ({exc})") from None
    if m.get("format") != FORMAT or not m.get("complete"):
        raise WorkbenchError(f"package: {mf} is not a complete {FORMAT} manifest")
    if str(m.get("converter_version")) != CONVERTER_VERSION:
        raise WorkbenchError(f"package: made by converter version {m.get('converter_version')!r}; this reads "
                             f"{CONVERTER_VERSION!r} (convert the checkpoint again)")
    return m  # type: ignore[no-any-return]


def stage_entry(manifest: dict[str, Any], stage: int) -> dict[str, Any]:
    stages = manifest["stages"]
    if not isinstance(stage, int) or not 0 <= stage < len(stages):
        raise WorkbenchError(f"stage: {stage!r} is not a stage of this package (0..{len(stages) - 1})")
    return stages[stage]  # type: ignore[no-any-return]


def verify(package: str | Path, stage: int | None = None) -> None:
    """Check the sha256 of one stage's file (or of every file) against the manifest."""
    p = Path(package)
    m = read_manifest(p)
    names = [stage_entry(m, stage)["file"]] if stage is not None else list(m["files"])
    for name in names:
        f = p / name
        if not f.is_file():
            raise WorkbenchError(f"package: {f} is missing (the manifest lists it)")
        want = m["files"][name]
        if f.stat().st_size != want["bytes"]:
            raise WorkbenchError(f"package: {f} has {f.stat().st_size} bytes, the manifest says {want['bytes']} "
                                 "(truncated or replaced; convert again)")
        got = sha256_file(f)
        if got != want["sha256"]:
            raise WorkbenchError(f"package: {f} fails its checksum (sha256 {got[:12]}… ≠ manifest "
                                 f"{want['sha256'][:12]}…); the file is corrupt, convert again")


def load_stage(package: str | Path, stage: int, device: Any = "cpu", *, check: bool = True,
               dequantize: bool = True, dtype: Any = None) -> dict[str, Any]:
    """The tensors of stage `stage`, on `device`, by Hugging Face name.

    `check` verifies the file's sha256 first. With `dequantize`, fp8/int8 weights come back as
    floating point (`dtype`, default the checkpoint's original dtype) and the scales are dropped.
    """
    import torch
    from safetensors.torch import load_file

    p = Path(package)
    m = read_manifest(p)
    entry = stage_entry(m, stage)
    if check:
        verify(p, stage)
    name = entry["file"]
    tensors = load_file(str(p / name), device=str(device))
    if not dequantize:
        return tensors
    info = m["files"][name]["tensors"]
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        meta = info.get(k, {})
        if "scale_of" in meta:
            continue
        q = meta.get("quantized")
        if q:
            from kernels.quant import dequantize_reference

            target = dtype or {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
                q["source_dtype"], torch.float32)
            codes = v.view(torch.uint8) if q["format"] == "fp8" else v
            w = dequantize_reference(codes, tensors[q["scale"]], q["format"], tuple(q.get("block", BLOCK)))
            out[k] = w.to(target)
        else:
            out[k] = v
    return out


def load_package(package: str | Path, device: Any = "cpu", **kw: Any) -> dict[str, Any]:
    """Every tensor of replica 0 (its stages merged), e.g. to check a package against its checkpoint."""
    m = read_manifest(package)
    out: dict[str, Any] = {}
    for s in m["stages"]:
        if s["replica"] == 0:
            out.update(load_stage(package, s["index"], device, **kw))
    return out

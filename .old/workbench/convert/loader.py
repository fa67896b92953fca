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


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "embed_tokens", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj", "w2")


def tp_slice(name: str, t: Any, rank: int, size: int) -> Any:
    """Megatron-style TP shard `rank` of `size` of a Hugging Face tensor: column-parallel projections (and the
    vocabulary of embeddings/head) split their rows, row-parallel ones their columns; norms, biases of
    row-parallel layers and the MoE router are replicated."""
    parts = name.split(".")
    kind = parts[-2] if len(parts) >= 2 else ""
    if size == 1 or t.dim() == 0:
        return t
    if kind in COLUMN_PARALLEL:
        dim = 0
    elif kind in ROW_PARALLEL and parts[-1] == "weight":
        dim = 1
    else:
        return t
    n = t.shape[dim]
    if n % size:
        raise WorkbenchError(f"tp: {name} has {n} {'rows' if dim == 0 else 'columns'}, not divisible by tp={size}")
    return t.narrow(dim, rank * (n // size), n // size).contiguous()


def load_stage(package: str | Path, stage: int, device: Any = "cpu", *, check: bool = True,
               dequantize: bool = True, dtype: Any = None, tp_rank: int = 0, tp_size: int = 1) -> dict[str, Any]:
    """The tensors of stage `stage`, on `device`, by Hugging Face name.

    `check` verifies the file's sha256 first. With `dequantize`, fp8/int8 weights come back as
    floating point (`dtype`, default the checkpoint's original dtype) and the scales are dropped.
    `tp_rank`/`tp_size` return that TP rank's shard (`tp_slice`; needs `dequantize`).
    """
    if tp_size > 1 and not dequantize:
        raise WorkbenchError("tp_size: TP shards are cut from dequantised weights; keep dequantize=True")
    if not 0 <= tp_rank < tp_size:
        raise WorkbenchError(f"tp_rank: {tp_rank} is not in 0..{tp_size - 1}")
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
    if tp_size > 1:
        out = {k: tp_slice(k, v, tp_rank, tp_size) for k, v in out.items()}
    return out


def load_package(package: str | Path, device: Any = "cpu", **kw: Any) -> dict[str, Any]:
    """Every tensor of replica 0 (its stages merged), e.g. to check a package against its checkpoint."""
    m = read_manifest(package)
    out: dict[str, Any] = {}
    for s in m["stages"]:
        if s["replica"] == 0:
            out.update(load_stage(package, s["index"], device, **kw))
    return out

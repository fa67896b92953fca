"""`convert`: a Hugging Face checkpoint → a model package laid out by a `Placement`.

The package is one safetensors file per stage (stages of different replicas that hold the same
layers in the same formats share a file), the tokenizer and config files, and `manifest.json`
(placement, model config, per-file sha256 and bytes, format of every tensor, converter version).

Streaming: the output files' headers are computed first from the input headers alone, the files
are pre-sized, then every input shard is read once, one tensor at a time, and each tensor's
bytes are written at their offset in every stage file that needs it — never more than one shard
(in fact one tensor) in memory. Quantised layers (fp8 e4m3 / int8) use `kernels.quant` with one
fp32 scale per 128×128 block, stored beside the weight as `<name>_scale_inv` (the layout of
DeepSeek-V3's fp8 checkpoints: weight ≈ codes × scale_inv).

Atomic: everything is written into `.<out>.partial` next to the output and renamed at the end;
a run that finds a `.partial` left by an interrupted run starts clean; on any error the
partial folder is removed, so a folder with `manifest.json` is always a complete package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.convert.names import EMBED, FINAL_NORM, HEAD, is_linear_weight, layer_of, missing_tensors
from workbench.errors import WorkbenchError
from workbench.plan.placement import Placement

CONVERTER_VERSION = "1"
FORMAT = "workbench-model-package"
BLOCK = (128, 128)
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_OUT = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
SKIP_COPY = {"model.safetensors.index.json"}


@dataclass(frozen=True)
class _InTensor:
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class _OutTensor:
    name: str
    source: str
    dtype: str
    shape: tuple[int, ...]
    precision: str  # fp32 | bf16 | fp16 | fp8 | int8 | as-is
    role: str  # weight | scale
    offset: int = 0

    @property
    def nbytes(self) -> int:
        n = ST_DTYPES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data start) of a safetensors file; errors say corrupt or truncated, naming the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WorkbenchError(f"checkpoint: {path.name} is truncated ({size} bytes; no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise WorkbenchError(f"checkpoint: {path.name} is corrupt or truncated (header claims {n} bytes, "
                                     f"file has {size})")
            raw = f.read(n)
    except OSError as exc:
        raise WorkbenchError(f"checkpoint: cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WorkbenchError(f"checkpoint: {path.name} is corrupt (its safetensors header is not JSON)") from None
    if not isinstance(header, dict):
        raise WorkbenchError(f"checkpoint: {path.name} is corrupt (header is not a mapping)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
            dt, shape = v["dtype"], v["shape"]
        except (KeyError, TypeError, ValueError):
            raise WorkbenchError(f"checkpoint: {path.name} is corrupt (entry {k!r} lacks dtype/shape/data_offsets)") from None
        if dt not in ST_DTYPES:
            raise WorkbenchError(f"checkpoint: {path.name}: tensor {k!r} has dtype {dt!r} the converter does not read")
        count = 1
        for d in shape:
            count *= int(d)
        if b - a != count * ST_DTYPES[dt]:
            raise WorkbenchError(f"checkpoint: {path.name} is corrupt (tensor {k!r}: {b - a} bytes for shape {shape} {dt})")
        end = max(end, int(b))
    if 8 + n + end != size:
        raise WorkbenchError(f"checkpoint: {path.name} is truncated or corrupt: its header needs {8 + n + end} bytes, "
                             f"the file has {size}")
    return header, 8 + n


def _inputs(ckpt: Path) -> tuple[dict[str, Any], list[Path], dict[str, _InTensor]]:
    if not ckpt.is_dir():
        raise WorkbenchError(f"checkpoint: {str(ckpt)!r} is not a folder (give a Hugging Face checkpoint folder)")
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise WorkbenchError(f"checkpoint: {ckpt}/config.json is missing (a Hugging Face checkpoint has one)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"checkpoint: {cfg_path} is not valid JSON ({exc})") from None
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WorkbenchError(f"checkpoint: {index} is not a safetensors index (no weight_map)") from None
        shards = sorted({ckpt / f for f in wm.values()})
        for s in shards:
            if not s.is_file():
                raise WorkbenchError(f"checkpoint: {s.name} is listed in model.safetensors.index.json but missing")
    else:
        shards = sorted(ckpt.glob("*.safetensors"))
        wm = None
    if not shards:
        raise WorkbenchError(f"checkpoint: no *.safetensors under {ckpt}")
    tensors: dict[str, _InTensor] = {}
    for s in shards:
        header, _ = read_header(s)
        for k, v in header.items():
            if k == "__metadata__":
                continue
            tensors[k] = _InTensor(k, s, v["dtype"], tuple(int(d) for d in v["shape"]))
    if wm is not None:
        for k, f in wm.items():
            if k not in tensors or tensors[k].shard.name != f:
                raise WorkbenchError(f"checkpoint: {k} is listed in the index under {f} but that shard lacks it")
    miss = missing_tensors(cfg, set(tensors))
    if miss:
        more = f" (and {len(miss) - 1} more)" if len(miss) > 1 else ""
        raise WorkbenchError(f"checkpoint: tensor {miss[0]}{more} is missing from {ckpt} (config.json expects it)")
    return cfg, shards, tensors


def _layout(cfg: dict[str, Any], pl: Placement, tensors: dict[str, _InTensor]) -> tuple[list[dict[str, Any]], dict[str, list[_OutTensor]]]:
    """Stage → file assignment and every output file's tensors (names, dtypes, shapes, offsets)."""
    L = int(cfg["num_hidden_layers"])
    if pl.num_layers != L:
        raise WorkbenchError(f"placement.num_layers: {pl.num_layers} but config.json has num_hidden_layers={L}")
    stages: list[dict[str, Any]] = []
    files: dict[str, list[_OutTensor]] = {}
    by_key: dict[Any, str] = {}
    tied = bool(cfg.get("tie_word_embeddings"))
    for ref in pl.stages:
        st = ref.stage
        precs = tuple(st.layer_precision(i) for i in range(st.first, st.last + 1))
        for p in set(precs) | {st.precision}:
            if p == "fp4":
                raise WorkbenchError(f"stage {ref.index}.precision: fp4 has no quantisation kernel in kernels/quant.py "
                                     "yet; use fp8 or int8 for this stage")
        last = st.last == L - 1
        key = (st.layers, precs, st.precision, last)
        if key not in by_key:
            name = f"stage-{len(by_key):03d}.safetensors"
            by_key[key] = name
            out: list[_OutTensor] = []
            for t in tensors.values():
                li = layer_of(t.name)
                if li is not None:
                    if not st.first <= li <= st.last:
                        continue
                    prec = st.layer_precision(li)
                elif t.name == EMBED:
                    if st.first != 0 and not (tied and last):
                        continue
                    prec = st.precision
                elif t.name in (FINAL_NORM, HEAD):
                    if not last:
                        continue
                    prec = st.precision
                elif st.first != 0:  # anything else (e.g. rotary buffers) travels with the first stage
                    continue
                else:
                    prec = st.precision
                out += _convert_plan(t, prec)
            out.sort(key=lambda o: o.name)
            off = 0
            for o in out:
                o.offset = off
                off += o.nbytes
            files[name] = out
        stages.append({"index": ref.index, "replica": ref.replica, "file": by_key[key], "devices": list(st.devices),
                       "layers": [st.first, st.last], "tp": st.tp, "precision": st.precision,
                       "kv_precision": st.kv_precision})
    return stages, files


def _convert_plan(t: _InTensor, prec: str) -> list[_OutTensor]:
    if prec in ("fp8", "int8") and is_linear_weight(t.name, t.shape):
        from kernels.quant import scale_shape

        return [_OutTensor(t.name, t.name, "F8_E4M3" if prec == "fp8" else "I8", t.shape, prec, "weight"),
                _OutTensor(t.name + "_scale_inv", t.name, "F32", scale_shape(t.shape, BLOCK), prec, "scale")]
    if prec in FLOAT_OUT and t.dtype in ("F32", "F16", "BF16", "F64"):
        return [_OutTensor(t.name, t.name, FLOAT_OUT[prec], t.shape, prec, "weight")]
    return [_OutTensor(t.name, t.name, t.dtype, t.shape, "as-is", "weight")]


def _torch_dtype(st: str) -> Any:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[st]


def _header_bytes(out: list[_OutTensor], meta: dict[str, str]) -> bytes:
    h: dict[str, Any] = {"__metadata__": meta}
    for o in out:
        h[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [o.offset, o.offset + o.nbytes]}
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(x: Any) -> memoryview:
    import torch

    x = x.contiguous()
    return memoryview(x.view(torch.uint8).numpy()) if x.numel() else memoryview(b"")  # type: ignore[arg-type]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def convert(checkpoint: str | Path, placement: Placement | str | Path, out: str | Path, *, cluster: Any = None,
            force: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Convert `checkpoint` into a package at `out` laid out by `placement`; returns a summary
    (files, bytes read and written, seconds, GB/s)."""
    import torch
    from safetensors import SafetensorError, safe_open

    t0, c0 = time.perf_counter(), time.process_time()
    ckpt, out = Path(checkpoint), Path(out)
    pl = placement if isinstance(placement, Placement) else Placement.load(placement)
    pl.validate(cluster)  # devices exist, TP inside a node, formats the GPUs support (when a cluster is known)
    cfg, shards, tensors = _inputs(ckpt)
    stages, files = _layout(cfg, pl, tensors)
    if out.exists() and not force:
        what = "a package" if (out / "manifest.json").is_file() else "a folder"
        raise WorkbenchError(f"out: {out} already exists ({what}); remove it or pass --force to replace it")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():  # an interrupted run: start clean
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        handles = {}
        for name, outs in files.items():
            head = _header_bytes(outs, {"format": "pt", "producer": f"workbench convert {CONVERTER_VERSION}"})
            f = (tmp / name).open("w+b")
            f.write(head)
            f.truncate(len(head) + sum(o.nbytes for o in outs))
            handles[name] = (f, len(head))
        targets: dict[str, list[tuple[str, _OutTensor]]] = {}
        for name, outs in files.items():
            for o in outs:
                targets.setdefault(o.source, []).append((name, o))
        total_in = sum(s.stat().st_size for s in shards)
        from tqdm import tqdm

        bar = tqdm(total=total_in, unit="B", unit_scale=True, desc="convert",
                   disable=(not os.isatty(2)) if progress is None else not progress)
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as sf:
                    for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                        want = targets.get(name, [])
                        if not want:
                            continue
                        x = sf.get_tensor(name)
                        cache: dict[str, Any] = {}
                        for fname, o in want:
                            data = _converted(x, o, cache)
                            f, base = handles[fname]
                            f.seek(base + o.offset)
                            f.write(_tensor_bytes(data))
                        del x, cache
            except SafetensorError as exc:
                raise WorkbenchError(f"checkpoint: {shard.name} is corrupt ({exc})") from None
            bar.update(shard.stat().st_size)
        bar.close()
        for f, _ in handles.values():
            f.close()
        file_rows: dict[str, dict[str, Any]] = {}
        for name, outs in files.items():
            p = tmp / name
            file_rows[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size,
                               "tensors": {o.name: {"dtype": o.dtype, "shape": list(o.shape), "precision": o.precision,
                                                    **({"quantized": {"format": o.precision, "block": list(BLOCK),
                                                                      "scale": o.name + "_scale_inv",
                                                                      "source_dtype": tensors[o.source].dtype}}
                                                       if o.role == "weight" and o.precision in ("fp8", "int8")
                                                       else {}),
                                                    **({"scale_of": o.source} if o.role == "scale" else {})}
                                           for o in outs}}
        copied = []
        for p in sorted(ckpt.iterdir()):
            if p.is_file() and p.suffix != ".safetensors" and p.name not in SKIP_COPY:
                shutil.copy2(p, tmp / p.name)
                copied.append(p.name)
        manifest = {"format": FORMAT, "converter_version": CONVERTER_VERSION, "torch": torch.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": {"path": str(ckpt.resolve()), "shards": [s.name for s in shards]},
                    "config": cfg, "placement": pl.to_dict(), "stages": stages, "files": file_rows,
                    "copied": copied, "complete": True}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():  # --force: swap atomically, then drop the old one
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        for f, _ in locals().get("handles", {}).values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    written = sum(r["bytes"] for r in file_rows.values())
    return {"package": str(out), "files": len(file_rows), "stages": len(stages), "bytes_read": total_in,
            "bytes_written": written, "seconds": secs, "cpu_seconds": time.process_time() - c0,
            "read_GBps": total_in / secs / 1e9}


def _converted(x: Any, o: _OutTensor, cache: dict[str, Any]) -> Any:
    """The bytes an output tensor holds: cast, quantised codes, or their scales (quantised once per source)."""
    import torch

    quantised = o.precision in ("fp8", "int8") and (o.role == "scale" or o.dtype in ("F8_E4M3", "I8"))
    if quantised:
        key = o.precision
        if key not in cache:
            from kernels.quant import quantize

            q, s = quantize(x.to(torch.float32).numpy(), o.precision, BLOCK)
            cache[key] = (torch.from_numpy(q), torch.from_numpy(s))
        q, s = cache[key]
        return s if o.role == "scale" else q
    if o.dtype in ("F32", "F16", "BF16", "F64") and o.precision != "as-is":
        return x.to(_torch_dtype(o.dtype))
    return x

"""Reading user files safely: bounded size, nesting and alias expansion; safe YAML; clear errors.

Every file a user hands the workbench (cluster files, job files, Hugging Face `config.json`)
is read here: a regular file of at most `MAX_BYTES`, UTF-8, then JSON (strict) or YAML (the safe
loader: no object tags) with at most `MAX_DEPTH` levels of nesting, `MAX_ALIASES` aliases and
`MAX_NODES` values once aliases are expanded (a "billion laughs" file is refused in
milliseconds), and no key given twice. Errors are `WorkbenchError`s naming the file, bounded.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.validate import show

MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_ALIASES = 1000
MAX_NODES = 1_000_000
MAX_PATH = 4096


def _name(p: Path | str) -> str:
    return show(str(p), 200)


def check_path(path: str | Path, what: str) -> Path:
    """`path` as a Path, or an error if it cannot name a file (too long, NUL bytes, not text)."""
    if isinstance(path, bytes) or not isinstance(path, (str, Path)):
        raise WorkbenchError(f"{what}: expected a file path, got {show(path)}")
    s = str(path)
    if not s or "\0" in s or len(s) > MAX_PATH or any(len(part) > 255 for part in Path(s).parts):
        raise WorkbenchError(f"{what}: {_name(s)} cannot be a file name (empty, too long or with a NUL byte)")
    return Path(s)


def is_file(path: str | Path) -> bool:
    """True if `path` names an existing regular file; never raises (long names, NUL bytes: False)."""
    try:
        s = str(path)
        if not s or "\0" in s or len(s) > MAX_PATH or any(len(part) > 255 for part in Path(s).parts):
            return False
        return Path(s).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    """True if `path` names an existing directory; never raises."""
    try:
        s = str(path)
        if not s or "\0" in s or len(s) > MAX_PATH or any(len(part) > 255 for part in Path(s).parts):
            return False
        return Path(s).is_dir()
    except (OSError, ValueError):
        return False


def read_text(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> str:
    """The text of a user file, or a WorkbenchError saying what is wrong with it."""
    p = check_path(path, what)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise WorkbenchError(f"{what}: {_name(p)} is a directory; give a file")
        if not stat.S_ISREG(st.st_mode):
            raise WorkbenchError(f"{what}: {_name(p)} is not a regular file")
        if st.st_size > max_bytes:
            raise WorkbenchError(f"{what}: {_name(p)} is {st.st_size} bytes; the limit is {max_bytes}")
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise WorkbenchError(f"{what}: no such file {_name(p)}") from None
    except OSError as exc:
        raise WorkbenchError(f"{what}: cannot read {_name(p)}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise WorkbenchError(f"{what}: {_name(p)} is larger than the limit of {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"{what}: {_name(p)} is not UTF-8 text (bad byte at offset {exc.start})") from None


# ------------------------------------------------------------------ parsing
class _TooBig(Exception):
    """Raised inside the loaders when a limit is passed (turned into a WorkbenchError)."""


def _loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """The safe loader with limits on depth and aliases, and no duplicate keys."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._depth = 0
            self._aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_ALIASES:
                    raise _TooBig(f"more than {MAX_ALIASES} aliases")
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"nested more than {MAX_DEPTH} levels deep")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key_node.tag != "tag:yaml.org,2002:merge":
                    if key in seen:
                        raise _TooBig(f"key {show(key, 40)} is given twice (line {key_node.start_mark.line + 1})")
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _expanded_size(root: Any) -> int:
    """Values in the YAML node graph once aliases are expanded (shared nodes counted each time)."""
    import yaml

    memo: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: Any, depth: int) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in busy:
            raise _TooBig("an alias refers to itself (a recursive structure)")
        busy.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                n += size(child, depth + 1)
                if n > MAX_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                n += size(k, depth + 1) + size(v, depth + 1)
                if n > MAX_NODES:
                    break
        busy.discard(key)
        memo[key] = n
        if n > MAX_NODES:
            raise _TooBig(f"more than {MAX_NODES} values once aliases are expanded")
        return n

    return size(root, 0)


def _depth(obj: Any) -> int:
    """Nesting depth of plain JSON data, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _TooBig(f"key {show(k, 40)} is given twice")
        out[k] = v
    return out


def parse_structured(text: str, what: str) -> Any:
    """JSON or YAML text → plain data, within the limits above; errors name `what`, bounded in length."""
    import yaml

    if not isinstance(text, str):
        raise WorkbenchError(f"{what}: expected text, got {show(text)}")
    if len(text) > MAX_BYTES:
        raise WorkbenchError(f"{what}: {len(text)} characters; the limit is {MAX_BYTES}")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _TooBig as exc:
        raise WorkbenchError(f"{what}: {exc}") from None
    except RecursionError:
        raise WorkbenchError(f"{what}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:
        pass  # not JSON: read it as YAML
    else:
        if _depth(data) > MAX_DEPTH:
            raise WorkbenchError(f"{what}: nested more than {MAX_DEPTH} levels deep")
        return data
    loader = None
    try:
        loader = _loader()(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except _TooBig as exc:
        raise WorkbenchError(f"{what}: {exc}") from None
    except RecursionError:
        raise WorkbenchError(f"{what}: nested more than {MAX_DEPTH} levels deep") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        first = " ".join(str(exc).split())
        raise WorkbenchError(f"{what}: not valid YAML/JSON ({first[:300]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_structured(path: str | Path, what: str) -> Any:
    return parse_structured(read_text(path, what), what)


# ------------------------------------------------------------------ outputs
def check_output(path: str | Path, what: str, directory: bool = False) -> Path:
    """Check before any work starts that `path` can be written (a file, or a folder to write into).

    Its folder must already exist (nothing is created but what the user asked for), be a folder,
    be writable and have space; a file must not be a directory. Checked by really creating (and
    removing) a scratch file there, so read-only mounts and permissions are caught for root too.
    """
    import os
    import tempfile

    p = check_path(path, what)
    if directory and p.exists():
        if not p.is_dir():
            raise WorkbenchError(f"{what}: {_name(p)} exists and is not a folder")
        parent = p
    else:
        if not directory and p.is_dir():
            raise WorkbenchError(f"{what}: {_name(p)} is a directory; give a file name")
        parent = p.parent
        if not parent.exists():
            raise WorkbenchError(f"{what}: the folder {_name(parent)} does not exist (create it first, or write elsewhere)")
        if not parent.is_dir():
            raise WorkbenchError(f"{what}: {_name(parent)} is not a folder")
    if not directory and p.exists():
        if not os.access(p, os.W_OK):
            raise WorkbenchError(f"{what}: {_name(p)} is not writable")
        return p
    try:
        fd, scratch = tempfile.mkstemp(prefix=".workbench-check-", dir=parent)
        os.close(fd)
        os.unlink(scratch)
    except OSError as exc:
        raise WorkbenchError(f"{what}: cannot write in {_name(parent)}: {exc.strerror or exc}") from None
    try:
        st = os.statvfs(parent)
        if st.f_bavail == 0 and st.f_blocks > 0:
            raise WorkbenchError(f"{what}: no space left in {_name(parent)}")
    except OSError:
        pass
    return p

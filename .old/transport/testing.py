"""`PeerProcess`: an engine in a spawned process, driven over a pipe (for tests, notebooks, demos).

The child registers one buffer (CPU numpy or a CUDA tensor) and answers small requests:
its descriptor, a CRC32 or the bytes of a range, fill, wait for immediates, write back to
a descriptor, flood a descriptor with writes (to be killed mid-transfer).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from typing import Any

from transport.descriptors import MemoryDescriptor


def _as_numpy(buf: Any) -> Any:
    import numpy as np

    if isinstance(buf, np.ndarray):
        return buf
    return buf.cpu().numpy()


def _main(conn: Any, backend: str, nbytes: int, device: str, lanes: int, secret: str, host: str) -> None:
    os.environ["WORKBENCH_TRANSPORT_SECRET"] = secret
    import numpy as np

    from transport.engine import Engine

    eng = Engine(backend, lanes=lanes, host=host)
    buf: Any = eng.alloc(nbytes, device)
    region = eng.register(buf)
    conn.send(("ok", region.descriptor.to_bytes()))
    src_region = None
    while True:
        try:
            op, *args = conn.recv()
        except EOFError:
            break
        try:
            if op == "crc":
                off, n = args
                if device.startswith("cuda"):
                    import torch

                    torch.cuda.synchronize()
                out: Any = zlib.crc32(_as_numpy(buf[off:off + n]))
            elif op == "read":
                off, n = args
                out = _as_numpy(buf[off:off + n]).tobytes()
            elif op == "fill":
                buf[:] = args[0]
                out = True
            elif op == "expect":
                imm, n, timeout = args
                eng.expect(imm, n, timeout=timeout).result()
                out = eng.counter.total(imm)
            elif op == "write":  # write `n` random bytes (seeded) to desc at off; returns their CRC
                desc, off, n, imm, seed = args
                data = np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)
                if src_region is not None:
                    eng.deregister(src_region)
                data_buf: Any = eng.alloc(n, device)
                if device.startswith("cuda"):
                    import torch

                    data_buf.copy_(torch.from_numpy(data))
                else:
                    data_buf[:] = data
                src_region = eng.register(data_buf)
                eng.write(src_region, MemoryDescriptor.from_bytes(desc), n, dst_offset=off, imm=imm).result(60)
                out = zlib.crc32(data)
            elif op == "flood":  # keep writing in the background until killed
                desc, n, imm = args
                d = MemoryDescriptor.from_bytes(desc)
                src_flood = eng.register(eng.alloc(n, device))

                def flood(src_flood: Any = src_flood, d: Any = d, n: int = n, imm: int = imm) -> None:
                    while True:
                        try:
                            eng.write(src_flood, d, n, imm=imm).result(60)
                        except Exception:  # noqa: BLE001
                            return

                threading.Thread(target=flood, daemon=True).start()
                out = True
            elif op == "barrier":
                from transport.descriptors import EngineAddress

                eng.barrier([EngineAddress.from_bytes(a) for a in args[0]], timeout=args[1])
                out = True
            elif op == "exit":
                conn.send(("ok", True))
                break
            else:
                raise ValueError(f"unknown request {op!r}")
            conn.send(("ok", out))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    eng.close()


class PinnedStandIn:
    """Stands in for a pinned host tensor without a GPU (numpy memory and its address: `numpy()`, `data_ptr()`), for
    exercising the cuda_ipc path's host ring on a CPU."""

    def __init__(self, n: int) -> None:
        import numpy as np

        self.a = np.zeros(n, np.uint8)

    def numpy(self) -> Any:
        return self.a

    def data_ptr(self) -> int:
        return int(self.a.ctypes.data)


class CudaTensorStandIn:
    """Stands in for a CUDA tensor of `n` bytes at device address `ptr` on device 0 (`data_ptr()`, `numel()`,
    `device`), for exercising the cuda_ipc path's posting on a CPU."""

    def __init__(self, n: int, ptr: int) -> None:
        from types import SimpleNamespace

        self.n, self.ptr = n, ptr
        self.device = SimpleNamespace(index=0, type="cuda")

    def data_ptr(self) -> int:
        return self.ptr

    def numel(self) -> int:
        return self.n


class PeerProcess:
    """An engine with one registered buffer of `nbytes` in a spawned process."""

    def __init__(self, backend: str = "tcp", nbytes: int = 1 << 20, *, device: str = "cpu", lanes: int = 2,
                 host: str = "127.0.0.1", start_timeout: float = 120.0) -> None:
        from transport.engine import SECRET_ENV

        secret = os.environ.setdefault(SECRET_ENV, os.urandom(16).hex())
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # not a daemon: its engine may start processes of its own (the NIXL worker); it exits with its pipe
        self.proc = ctx.Process(target=_main, args=(child, backend, nbytes, device, lanes, secret, host))
        self.proc.start()
        self.desc: MemoryDescriptor = MemoryDescriptor.from_bytes(self._reply(start_timeout))

    def _reply(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.1):
            if not self.proc.is_alive():
                raise RuntimeError(f"peer process died (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer process did not answer within {timeout} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"peer: {value}")
        return value

    def call(self, *request: Any, timeout: float = 60.0) -> Any:
        self.conn.send(request)
        return self._reply(timeout)

    @property
    def address(self) -> Any:
        return self.desc.address

    def crc(self, offset: int, n: int) -> int:
        return int(self.call("crc", offset, n))

    def read(self, offset: int, n: int) -> bytes:
        return bytes(self.call("read", offset, n))

    def stop(self, timeout: float = 20.0) -> None:
        """SIGSTOP the peer, until every thread of it is stopped (a signal takes effect when each thread next runs)."""
        pid = self.proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{task}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue
            if states and all(st in "tT" for st in states):
                return
            time.sleep(0.01)
        raise AssertionError(f"process {pid} did not stop within {timeout} s")

    def resume(self) -> None:
        """SIGCONT the peer if it is still there."""
        if self.proc.is_alive() and self.proc.pid is not None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill_while_waiting(self, engine: Any, src: Any, nbytes: int, timeout: float = 20.0) -> float:
        """Stop the peer, post a waited write of `nbytes` from `src` to it with `timeout`, kill the peer 0.2 s into
        the wait: the write must fail with `PeerGone`. Returns how long `result` took."""
        from transport.errors import PeerGone

        self.stop()
        try:
            t = engine.write(src, self.desc, nbytes, timeout=timeout)
            killer = threading.Timer(0.2, self.kill)
            killer.start()
            t0 = time.monotonic()
            try:
                t.result(timeout + 10)
            except PeerGone:
                return time.monotonic() - t0
            finally:
                killer.join(30)
            raise AssertionError("the write to a killed peer completed")
        finally:
            self.resume()

    def kill(self) -> None:
        if self.proc.is_alive() and self.proc.pid is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=10)
            except Exception:  # noqa: BLE001
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""The cuda_ipc imm mailbox's ring protocol on shared host memory (no GPU needed).

On a GPU a one-thread kernel stores each entry after the copy; here a writer process stores
them from the host, in any order, through the same layout. The receiver's watcher must count
each entry once, only once it is complete, bound the writer by `consumed`, and give the ring
of a writer that died to the next one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from transport.backends import cuda_ipc_mailbox as mb

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not mb.SHM_DIR.is_dir(), reason="no /dev/shm")]

ROOT = Path(__file__).resolve().parents[1]


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())


def test_entries_from_another_process_counted_once_in_any_order() -> None:
    got: list[tuple[int, int, str]] = []
    box = mb.Mailbox(lambda imm, region, peer: got.append((imm, region, peer)))
    try:
        child = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from transport.backends.cuda_ipc_mailbox import Outbox, pack
            out = Outbox({box.name!r}, "writer-7")
            slots = [out.reserve() for _ in range(300)]
            for i in reversed(range(300)):  # the last reserved lands first
                addr, seq = slots[i]
                out.write_host(addr, pack(1000 + i, 5), seq)
            out.close()
        """)
        subprocess.run([sys.executable, "-c", child], check=True, timeout=30)
        assert _wait(lambda: box.counted >= 300), box.counted  # set at the end of the poll that counted them
        assert sorted(imm for imm, _, _ in got) == list(range(1000, 1300))
        assert {(region, peer) for _, region, peer in got} == {(5, "writer-7")}
        time.sleep(0.05)
        assert len(got) == 300 and box.counted == 300  # later polls count nothing twice
    finally:
        box.close()
    assert not box.path.exists()


def test_incomplete_entry_waits_and_the_writer_is_bounded() -> None:
    got: list[int] = []
    box = mb.Mailbox(lambda imm, region, peer: got.append(imm), watch=False)
    out = mb.Outbox(box.name, "w")
    try:
        first = out.reserve()
        assert first is not None
        rest = [out.reserve() for _ in range(mb.ENTRIES - 1)]
        assert out.reserve() is None  # ENTRIES ahead of what the receiver consumed: full
        for i, slot in enumerate(rest):
            assert slot is not None
            out.write_host(slot[0], mb.pack(i + 1, 0), slot[1])
        assert box.poll() == (mb.ENTRIES - 1, True)  # counted out of order; the first is still missing
        assert out.reserve() is None  # consumed cannot pass the missing first entry
        out.write_host(first[0], mb.pack(0, 0), first[1])
        assert box.poll() == (1, False)
        assert sorted(got) == list(range(mb.ENTRIES))
        again = out.reserve()  # the ring wrapped: position ENTRIES reuses slot 0
        assert again is not None and again[0] == first[0] and again[1] == mb.ENTRIES + 1
        assert box.poll() == (0, True)  # the old entry in slot 0 is not mistaken for the new one
        out.write_host(again[0], mb.pack(99, 0), again[1])
        assert box.poll() == (1, False) and got[-1] == 99
    finally:
        out.close()
        box.close()


def test_ring_of_a_dead_writer_is_reclaimed() -> None:
    got: list[tuple[int, str]] = []
    box = mb.Mailbox(lambda imm, region, peer: got.append((imm, peer)), watch=False)
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        old = mb.Outbox(box.name, "old")
        slot = old.reserve()
        assert slot is not None
        old.row[mb.OWNER] = int(dead)  # as if the process that claimed it had died before posting
        assert box.poll() == (0, True)
        new = mb.Outbox(box.name, "new")
        assert new.ring == old.ring and new.gen == old.gen + 1
        s = new.reserve()
        assert s is not None and s[1] == 1
        new.write_host(s[0], mb.pack(42, 3), s[1])
        assert box.poll() == (1, False) and got == [(42, "new")]
        new.close()
        assert box.table[new.ring, mb.OWNER] == 0
        old.close()  # no longer its ring: leaves it alone
    finally:
        box.close()


def test_names_are_checked_and_stale_mailboxes_swept(tmp_path: Path) -> None:
    with pytest.raises(mb.MailboxError):
        mb.Outbox("../etc/passwd", "w")
    with pytest.raises(mb.MailboxError):
        mb.Outbox("wbt-mbox-1-00000000", "w", directory=tmp_path)  # does not exist
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"wbt-mbox-{dead}-0123abcd"
    stale.write_bytes(b"\0" * 16)
    mine = tmp_path / f"wbt-mbox-{os.getpid()}-0123abcd"
    mine.write_bytes(b"\0" * 16)
    assert mb.sweep_stale(tmp_path) == 1
    assert not stale.exists() and mine.exists()
    with pytest.raises(mb.MailboxError):
        mb.Outbox(mine.name, "w", directory=tmp_path)  # too short to be a mailbox

"""Map memory: a sealed memfd that the daemon maps read-write and hands to readers.

Why a memfd: other processes can map the same pages (the client library reads map values in
place, see reader.py), and the daemon, the VM's helpers and persistence all use one buffer.

What keeps a reader from hurting anyone (each is tested in tests/vm/maps):
- the size is sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): nobody can truncate the file
  under the daemon's mapping (a SIGBUS in the daemon) or grow it;
- memory that only the daemon writes (hash tables, arrays without BPF_F_MMAPABLE) is also
  sealed F_SEAL_FUTURE_WRITE once the daemon has mapped it: no new writable mapping and no
  write(2), whatever fd a process holds or reopens through /proc;
- the file is mode 0600 of the daemon's uid, so /proc/PID/fd reopens by other users fail;
- readers get an fd opened O_RDONLY (`reader_fd`), writers of mmap-able arrays O_RDWR;
- a mapping does not keep its map alive (unlike the kernel's: the daemon cannot see a
  munmap, and a map kept alive by every client that once read it would never be freed): the
  map's life is its fds', pins' and programs'. Memory others may write (BPF_F_MMAPABLE
  arrays) is punched out when the map is freed, so a mapping kept after it reads zeros and
  holds no pages. Sealed memory cannot be punched (F_SEAL_FUTURE_WRITE forbids it): when it
  was handed out, `release` keeps a read-only probe fd, and the pages count as still in use
  (the daemon keeps the map's memlock charge, as the kernel does while a map is mmapped)
  until `gone` sees that no other process holds the file, by being granted a write lease,
  which the kernel grants only to a file's sole opener.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from ..errors import BpfError
from ..uapi import PAGE_SIZE

# include/uapi/linux/fcntl.h and falloc.h (Python's fcntl lacks the first).
F_SEAL_FUTURE_WRITE = 0x0010
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def round_to_pages(nbytes: int) -> int:
    return max(PAGE_SIZE, (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE)


class SharedMemory:
    """`size` zeroed bytes in a sealed memfd, mapped read-write in this process as `buf`.
    It holds two fds while the map lives: its own, and the one CPython's mmap keeps."""

    __slots__ = ("buf", "fd", "handed_out", "mm", "probe", "size", "user_writable")

    def __init__(self, name: str, nbytes: int, user_writable: bool = False):
        self.size = round_to_pages(nbytes)
        self.user_writable = user_writable
        try:
            fd = os.memfd_create(f"bpf-map:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise BpfError(errno.ENOMEM, f"cannot allocate map memory: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, self.size)
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            seals = SIZE_SEALS | fcntl.F_SEAL_SEAL
            if not user_writable:
                seals |= F_SEAL_FUTURE_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError as e:
            os.close(fd)
            raise BpfError(errno.ENOMEM, f"cannot allocate {self.size} bytes of map memory:"
                           f" {e.strerror}") from None
        self.fd = fd
        self.buf = memoryview(self.mm)
        self.handed_out = False  # reader_fd gave another process a copy
        self.probe = -1  # after release: a read-only fd that `gone` probes

    def reader_fd(self, writable: bool) -> int:
        """A new fd on this memory for another process: O_RDONLY, or O_RDWR when `writable`
        (only for memory made `user_writable`)."""
        if writable and not self.user_writable:
            raise BpfError(errno.EACCES, "this map's memory is written by the daemon only")
        if self.fd < 0:
            raise BpfError(errno.EBADF, "the map's memory is released")
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.handed_out = True
        try:
            return os.open(f"/proc/self/fd/{self.fd}", flags)
        except OSError as e:  # EMFILE, ENFILE: the caller's answer, not the daemon's failure
            raise BpfError(e.errno or errno.EIO, "cannot open the map's memory for the"
                           f" caller: {e.strerror}") from None

    def release(self) -> bool:
        """The map is gone: close the fd and unmap (or, while a view of the memory is still
        about, let it go with that); memory others may write is also punched out. True when
        the pages may still be held elsewhere (sealed memory that was handed out): `gone`
        then tells when they are not."""
        if self.fd < 0:
            return False
        if self.user_writable:  # (sealed memory refuses it: its pages go with the last user)
            _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, self.size)
        lingers = self.handed_out and not self.user_writable
        if lingers:
            self.probe = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.fd)
        self.fd = -1
        self._unmap()
        return lingers

    def _unmap(self) -> None:
        try:  # the mapping holds an fd of its own (CPython's mmap dups it)
            self.buf.release()
            self.mm.close()
        except (BufferError, ValueError):
            pass  # a view of it is still about: the mapping goes when it does

    def gone(self) -> bool:
        """After a release that lingers: whether no other process holds the memory any more
        (then the probe is closed, and the pages are freed)."""
        if self.probe < 0:
            return True
        self._unmap()  # a view of ours may have gone since
        try:
            fcntl.fcntl(self.probe, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError:
            return False  # EAGAIN: another open file (an fd, a mapping) of it exists
        fcntl.fcntl(self.probe, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(self.probe)
        self.probe = -1
        return True

    def __del__(self) -> None:  # a map that never reached the store (VM-only use, tests)
        for name in ("fd", "probe"):
            if getattr(self, name, -1) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


def check_sealed(fd: int, size: int) -> None:
    """A reader's check of an fd it was given: a memfd of at least `size` bytes whose size
    cannot change (so reading the mapping can never fault)."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & SIZE_SEALS != SIZE_SEALS:
        raise BpfError(errno.EINVAL, "map memory fd is not size-sealed")
    if os.fstat(fd).st_size < size:
        raise BpfError(errno.EINVAL, f"map memory fd holds {os.fstat(fd).st_size} bytes,"
                       f" fewer than the {size} its layout needs")

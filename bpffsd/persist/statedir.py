"""The state directory is trusted input: what it holds is replayed with the daemon's privileges
(programs included), and the daemon writes there as its own uid. So it must be the daemon's
own: owned by its uid, not writable by group or others, not a symlink, below directories no
other user controls (OpenSSH's StrictModes rule). Inside it every open follows no symlink and
every name is resolved relative to the directory's fd, so a path swapped after the checks
cannot redirect a write.
"""

from __future__ import annotations

import errno
import os
import stat

from bpffs.vm.errors import BpfError

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _describe(st: os.stat_result) -> str:
    return f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}"


def _refuse(path: str, why: str, fix: str) -> BpfError:
    return BpfError(errno.EPERM, f"refusing the state directory {path}: {why}; {fix},"
                    " or choose another --state-dir")


def _check_ancestors(path: str) -> None:
    """Every existing directory above the state directory is owned by root or by us and not
    writable by group or others unless sticky: else its owner or group could swap the state
    directory for one of their own."""
    uid = os.geteuid()
    parts = os.path.realpath(path).split(os.sep)
    for n in range(1, len(parts) + 1):
        ancestor = os.sep + os.path.join(*parts[1:n]) if n > 1 else os.sep
        try:
            st = os.lstat(ancestor)
        except FileNotFoundError:
            return
        if st.st_uid not in (0, uid) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise _refuse(path, f"its parent directory {ancestor} is {_describe(st)}, so another"
                          " user could replace the state directory",
                          f"make {ancestor} owned by root or uid {uid} and not writable by"
                          " group or others (`chmod go-w`)")


def _make_parents(path: str) -> None:
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass


def open_state_dir(path: str) -> int:
    """Create the state directory if missing, check it is the daemon's own and return an fd on
    it (O_DIRECTORY | O_NOFOLLOW); raise a BpfError that names the path, its owner and mode and
    what to do, before anything is written, when it is not."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    _check_ancestors(parent)
    try:
        _make_parents(parent)
        _check_ancestors(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    except OSError as e:
        if isinstance(e, BpfError):
            raise
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise _refuse(path, f"it is {what}", "use the real directory's path") from None
        raise BpfError(e.errno or errno.EIO, f"cannot create or open the state directory {path}:"
                       f" {e.strerror}") from None
    st = os.fstat(fd)
    uid = os.geteuid()
    if st.st_uid != uid or st.st_mode & 0o022:
        os.close(fd)
        raise _refuse(path, f"it is {_describe(st)}: bpffsd (uid {uid}) replays what it"
                      " holds with its own privileges, so it must be owned by uid"
                      f" {uid} and not writable by group or others",
                      f"`chown {uid} {path} && chmod 0700 {path}` after checking its contents")
    return fd


def read_file(dir_fd: int, name: str, path: str) -> bytes | None:
    """The contents of a regular file of ours in the state directory, None if it is missing;
    a symlink, another kind of file or another owner's file is refused, never followed."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BpfError(errno.ELOOP, f"{path} is a symbolic link: bpffsd follows no link in"
                           " its state directory; replace it by the file itself") from None
        raise BpfError(e.errno or errno.EIO, f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                or st.st_mode & 0o022):
            kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise BpfError(errno.EPERM, f"{path} is {kind} {_describe(st)}: bpffsd reads only"
                           f" regular files of its own (uid {os.geteuid()}) that no one else"
                           " may write there; check it, then chown/chmod go-w it")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_file(dir_fd: int, name: str, flags: int = 0) -> int:
    """A new empty file `name` (mode 0600) open for writing: whatever had that name (a
    symlink planted there included) is unlinked first, never written through."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | flags, 0o600,
                   dir_fd=dir_fd)

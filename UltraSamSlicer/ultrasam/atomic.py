"""Write files so that readers see the old file or the new one, never half of one.

Every output of the project (masks, reports, checkpoints, configs) goes through
:func:`atomic_path` or :func:`atomic_group`: the data goes to a hidden temporary file beside the
target, is flushed to the disk (``fsync``) and verified (size > 0, plus a format-specific check such
as reading the file back, or the size where it is known), and only then renamed over the target. Verification matters because
some writers report no error on a full disk: SimpleITK's leaves a 0-byte file and returns.

A failed write raises :class:`WriteError`, whose one-line message names the file; the previous
file is then byte-identical and no temporary file is left. New files get the user's umask (not
``mkstemp``'s 0600); a replaced file keeps its mode.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

# Raises (any exception) when the temporary file does not hold what was meant to be written.
Check = Callable[[Path], None]


class WriteError(OSError):
    """A file could not be written completely; the previous file (if any) is unchanged."""

    def __init__(self, path: Path, reason: str, outcome: Optional[str] = None) -> None:
        outcome = outcome or ("the previous file is unchanged" if path.exists() else "nothing was written")
        super().__init__(f"{path}: could not be written ({reason}); {outcome}")
        self.path = path  # not OSError.filename: that would change the message

    @classmethod
    def of(cls, path: str | os.PathLike, error: BaseException, outcome: Optional[str] = None) -> "WriteError":
        """The WriteError for ``error`` (e.g. ``[Errno 28]``, which names no file) met writing ``path``."""
        return cls(Path(path), _reason(error), outcome)


@dataclass
class _Pending:
    target: Path
    temporary: Path
    check: Optional[Check]


class AtomicGroup:
    """Files that replace their targets together, once every one of them is written and verified."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def add(self, path: str | os.PathLike, suffix: str = ".tmp", check: Optional[Check] = None) -> Path:
        """A temporary path to write ``path``'s new content to.

        ``suffix`` lets writers that pick the format from the file name (SimpleITK) see the real one;
        ``check`` verifies the written temporary file (e.g. reads it back).
        """
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        except OSError as error:
            raise WriteError.of(target, error) from None
        os.close(handle)
        self._pending.append(_Pending(target, Path(temporary), check))
        return Path(temporary)

    @property
    def current(self) -> Optional[Path]:
        """The target being written (the last one added)."""
        return self._pending[-1].target if self._pending else None

    def commit(self) -> None:
        for pending in self._pending:
            _verify(pending)
        for pending in self._pending:
            _give_mode(pending.temporary, pending.target)
            os.replace(pending.temporary, pending.target)

    def discard(self) -> None:
        for pending in self._pending:
            pending.temporary.unlink(missing_ok=True)


@contextmanager
def atomic_group() -> Iterator[AtomicGroup]:
    """Write several files all-or-nothing: ``group.add(path)`` gives each one's temporary path.

    On any error, or an interrupt, no target is touched and every temporary file is removed
    (after a crash, hidden ``.name.*`` files may remain; they are never read).
    """
    group = AtomicGroup()
    try:
        yield group
        group.commit()
    except WriteError:
        group.discard()
        raise
    except (OSError, RuntimeError) as error:  # torch.save and friends raise RuntimeError on a full disk
        group.discard()
        if group.current is None:
            raise
        raise WriteError.of(group.current, error) from None
    except BaseException:
        group.discard()
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", check: Optional[Check] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` if the block succeeds and the
    written file passes the checks (see :meth:`AtomicGroup.add`)."""
    with atomic_group() as group:
        yield group.add(path, suffix, check)


def write_text_atomic(path: str | os.PathLike, text: str, group: Optional[AtomicGroup] = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically, alone or as part of ``group``; the size
    is checked after the flush."""
    if group is None:
        with atomic_group() as group:
            return write_text_atomic(path, text, group)
    data = text.encode("utf-8")
    group.add(path, check=lambda written: _same_size(written, len(data))).write_bytes(data)


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`WriteError` now if ``path`` cannot be written: it is a folder, or its folder
    (or the nearest one that exists) is not a writable folder. For checks before long work."""
    target = Path(path)
    if target.is_dir():
        raise WriteError(target, "it is a folder; give a file name")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise WriteError(target, f"{folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(target, f"no permission to write in {folder}")


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _verify(pending: _Pending) -> None:
    try:
        with open(pending.temporary, "rb+") as stream:  # the data is on the disk before the name points to it
            os.fsync(stream.fileno())
        if pending.check is not None:
            pending.check(pending.temporary)
        elif pending.temporary.stat().st_size == 0:  # without a check, no writer means to write nothing
            raise OSError("0 bytes reached the disk; is it full?")
    except Exception as error:
        raise WriteError.of(pending.target, error) from None


def _give_mode(temporary: Path, target: Path) -> None:
    """A replaced file keeps its mode; a new one gets 0666 less the umask, like ``open()`` would."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    os.chmod(temporary, mode)


def _same_size(path: Path, expected: int) -> None:
    size = path.stat().st_size
    if size != expected:
        raise OSError(f"{size} of {expected} bytes reached the disk; is it full?")


def _reason(error: BaseException) -> str:
    """One line about ``error``: the OS's words for errno errors, else the message's first line."""
    if isinstance(error, OSError) and error.errno is not None:
        return f"{os.strerror(error.errno)} [Errno {error.errno}]"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[0] if lines else type(error).__name__
    if isinstance(error, RuntimeError):  # C++ writers (torch.save: "unexpected pos", "iostream error")
        detail = f"the writer stopped: {detail}; is the disk full?"
    return detail

"""Writing an export beside its target and renaming it into place, so no user file is ever lost.

An existing target is refused unless the caller passes ``overwrite`` *and* the target is a previous
export of the same format (the format's own recogniser says so). Everything is written into a
unique temporary sibling (same directory, so the final rename is atomic); a replaced export is
renamed aside first and removed only once the new one is in place; a failure removes only what
this call created (the temporary sibling and any parent directories it made). Final file modes
follow the user's umask, as any other program's files do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgerazor.errors import EdgeRazorError, OutputExistsError
from edgerazor.file_modes import apply_umask

#: ``foreign(path)``: None when ``path`` is a previous export of the format, else why it is not
Recogniser = Callable[[Path], "str | None"]


def check_target(target: Path, overwrite: bool, foreign: Recogniser, what: str) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` and it is a previous ``what``."""
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise OutputExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace a previous "
                                f"EdgeRazor {what} there, or choose another output path")
    reason = "it is a symbolic link" if target.is_symlink() else foreign(target)
    if reason is not None:
        raise OutputExistsError(f"{target} already exists and is not a previous EdgeRazor {what} ({reason}); "
                                "refusing to replace it, even with --overwrite: choose another output path")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing directories above the target; returns those created, deepest first."""
    missing = []
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    created = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            created.insert(0, directory)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            return


def _place(tmp: Path, target: Path, overwrite: bool, foreign: Recogniser, what: str) -> None:
    if os.path.lexists(target):
        check_target(target, overwrite, foreign, what)  # again: it may have appeared while this call wrote
        aside_dir = Path(tempfile.mkdtemp(prefix=f".{target.name[:64]}.", suffix=".old", dir=target.parent))
        aside = aside_dir / "previous"
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            aside_dir.rmdir()
            raise
        _remove(aside_dir)
    elif tmp.is_dir():
        os.rename(tmp, target)  # fails unless the target is still absent (or an empty directory: nothing lost)
    else:
        try:
            os.link(tmp, target)  # never replaces a file that appeared meanwhile
        except FileExistsError:
            check_target(target, False, foreign, what)
        except OSError:  # a filesystem without hard links
            os.rename(tmp, target)
            return
        tmp.unlink()


@contextmanager
def staged(target: str | os.PathLike, *, directory: bool, overwrite: bool, foreign: Recogniser,
           what: str) -> Iterator[Path]:
    """A temporary sibling of ``target`` (a directory or an empty file) to write into; renamed to ``target`` on success.

    Raises ``OutputExistsError`` when ``target`` exists and may not be replaced; an ``OSError`` while
    writing (disk full, read-only, name too long) becomes an ``EdgeRazorError`` naming the target.
    """
    target = Path(target)
    check_target(target, overwrite, foreign, what)
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = _make_parents(target.parent)
        prefix = f".{target.name[:64]}."
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        apply_umask(tmp)
        _place(tmp, target, overwrite, foreign, what)
    except BaseException as exc:
        if tmp is not None:
            _remove(tmp)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise EdgeRazorError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise

"""Writes the storage cut short (a full disk, a quota, a file size limit), in the forms their writers
report them, as the OSError the CLI prints in one line: where, why, and what to do (training.cli).

Python's own writes raise OSError, without the file's name when the write (not the open) failed;
safetensors and tokenizers, written in Rust, raise their own errors that end in "(os error N)"
(tokenizers a bare Exception); torch.save's zip writer says only "unexpected pos".
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

from safetensors import SafetensorError

FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos|PytorchStreamWriter failed writing")


def write_failure(error: BaseException, where: str | os.PathLike) -> OSError | None:
    """The storage error behind a write into `where` (a file, or the folder being written) that the
    storage cut short, naming it; None for any other error, and for an OSError that names the file
    it was writing already. A copy's names the file it read first (shutil), so it is renamed too."""
    if isinstance(error, OSError):
        unnamed = error.filename is None or error.filename2 is not None
        return OSError(error.errno, error.strerror, str(where)) if unnamed and error.errno in FULL else None
    if isinstance(error, SafetensorError) or type(error) is Exception:
        found = _RUST_OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else None
        return OSError(code, os.strerror(code), str(where)) if code in FULL else None
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILED.search(str(error)):
        return OSError(
            errno.ENOSPC,
            "could not be written: no space left on the device, or a quota or file size limit reached",
            str(where),
        )
    return None


@contextlib.contextmanager
def writing_into(where: str | os.PathLike) -> Iterator[None]:
    """A write the storage cuts short in the block raises the storage error naming `where`."""
    try:
        yield
    except Exception as e:
        failure = write_failure(e, where)
        if failure is None:
            raise
        raise failure from e

"""Reading the small files that hold keys and credentials (certificates, private keys, service accounts),
bounded: a file past its limit is refused without reading it further, whatever its name points at."""

from __future__ import annotations

import os


class FileTooLarge(ValueError):
    """A file holds more than its limit."""


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the file at ``path``; :class:`FileTooLarge` if it holds more than ``limit`` (only
    ``limit`` + 1 bytes are read), ``OSError`` if it cannot be read."""
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"more than {limit} bytes")
    return data

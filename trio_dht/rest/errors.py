"""The refusal of a REST request, as OpenDHT's proxy writes it: a status and ``{"err": message}``."""

from __future__ import annotations

import json


def error_body(message: str) -> bytes:
    """``{"err": message}`` and a newline, compact, as OpenDHT's proxy writes an error."""
    return json.dumps({"err": message}, separators=(",", ":")).encode() + b"\n"


class BadRequest(Exception):
    """A request refused with ``status`` (400 unless said) and the JSON ``body`` ``{"err": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message)

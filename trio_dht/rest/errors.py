"""The refusal of a REST request, as OpenDHT's proxy writes it: a status and ``{"err": message}``."""

from __future__ import annotations

import json


class BadRequest(Exception):
    """A request refused with ``status`` (400 unless said) and the JSON ``body`` ``{"err": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.body = json.dumps({"err": message}, separators=(",", ":")).encode() + b"\n"

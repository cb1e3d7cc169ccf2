"""A JSON response rendered with orjson, which knows datetimes; asyncpg's own UUID type is written as text."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)

"""Cached-context records: one small JSON file per context, written atomically (temp file + rename).

A record holds what the API needs to serve and delete a context: its owner (tenant), token ids, expiry and
registration progress. The KV itself lives in the KV store under content keys. Ids are random
(``ctx_`` + 128 random bits) and reveal nothing about the content.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ContextState = Literal["PROCESSING", "ACTIVE", "FAILED"]
_ID_RE = re.compile(r"ctx_[A-Za-z0-9_-]{22}")


def new_context_id() -> str:
    return "ctx_" + secrets.token_urlsafe(16)


def is_context_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


@dataclass(slots=True)
class ContextRecord:
    """One cached context. Times are Unix seconds."""

    id: str
    tenant: str
    model: str
    kind: Literal["text", "chat"]
    token_ids: list[int]
    create_time: float
    update_time: float
    expire_time: float
    display_name: str = ""
    messages: list[dict[str, str]] | None = None
    state: ContextState = "PROCESSING"
    num_chunks: int = 0
    num_chunks_stored: int = 0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def is_expired(self, now: float) -> bool:
        return now >= self.expire_time


class ContextRegistry:
    """Records as ``<dir>/<id>.json``. Safe for several processes sharing one directory (atomic renames)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, context_id: str) -> Path:
        if not is_context_id(context_id):
            raise KeyError(context_id)
        return self.directory / f"{context_id}.json"

    def put(self, record: ContextRecord) -> None:
        path = self._path(record.id)
        handle, scratch = tempfile.mkstemp(prefix=".ctx-", dir=self.directory)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(asdict(record), out)
            os.replace(scratch, path)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)

    def get(self, context_id: str) -> ContextRecord | None:
        try:
            data = json.loads(self._path(context_id).read_text())
        except (KeyError, FileNotFoundError, ValueError):
            return None
        return ContextRecord(**data)

    def delete(self, context_id: str) -> bool:
        try:
            self._path(context_id).unlink()
        except (KeyError, FileNotFoundError):
            return False
        return True

    def all(self) -> list[ContextRecord]:
        records = []
        for path in sorted(self.directory.glob("ctx_*.json")):
            record = self.get(path.stem)
            if record is not None:
                records.append(record)
        return records

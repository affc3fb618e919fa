"""Whole objects written atomically, JSON records, and the hashes that name content.

Every artifact is written to a temporary name and committed last: files by a rename (local) or by a single PUT of
the final object (S3, where an object is either fully there or absent), and folders by a record file (manifest.json,
lineage.json) that is written after everything else. A reader trusts a folder only when its record exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

from llm_platform.storage.uri import filesystem, is_remote, open_read, read_bytes


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: a temp file renamed in place (local), one PUT (S3)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_new(uri: str, data: bytes) -> bool:
    """Create an object only if nothing is at `uri` yet: True if this call created it, False if it existed.

    The check and the write are one step, so of two concurrent writers exactly one gets True: an exclusive create
    (`O_EXCL`) locally, a conditional PUT (`If-None-Match: *`, which S3 honours since 2024) on S3. For claims and
    locks (registry version numbers), not for content that must appear whole: a local reader can see the file
    before its bytes.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    """Write a JSON record atomically (sorted keys, indented, so records diff well)."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def fingerprint(obj: Any, length: int = 16) -> str:
    """A stable short hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(uri: str) -> str:
    h = hashlib.sha256()
    with open_read(uri) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""Streamed copies of files and folders between any two of local and S3: memory does not grow with a file's size,
and no object of a download lands outside its target folder."""

from __future__ import annotations

import os
import shutil
import uuid

import fsspec

from llm_platform.errors import DataError
from llm_platform.storage.uri import filesystem, is_remote, join

# S3 multipart uploads and ranged downloads: parts of UPLOAD_CHUNK_BYTES, UPLOAD_CONCURRENCY in flight. What a copy
# holds in memory is about their product (plus the S3 client's own copies), whatever the file's size.
UPLOAD_CHUNK_BYTES = 8 * 2**20
UPLOAD_CONCURRENCY = 4


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two of local and S3, streaming: memory does not grow with the file's size.

    S3 to S3 is a server-side copy (CopyObject; multipart copy past 5 GB): no byte passes through this process.
    Local to S3 is a multipart upload (`UPLOAD_CHUNK_BYTES` parts, `UPLOAD_CONCURRENCY` in flight), S3 to local a
    chunked download; a local destination is written beside itself and renamed into place, so a reader never sees
    half a file.
    """
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    if is_remote(src) and is_remote(dst):
        src_fs.copy(src_path, dst_path)
        return
    if not is_remote(src) and is_remote(dst):
        dst_fs.put_file(src_path, dst_path, chunksize=UPLOAD_CHUNK_BYTES, max_concurrency=UPLOAD_CONCURRENCY)
        return
    os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
    tmp = f"{dst_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if is_remote(src):
            _get_file(src_fs, src_path, tmp)
        else:
            shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_files(uri: str) -> list[str]:
    """The files under a folder URI as relative `a/b.txt` names (sorted). For S3, every key is checked as
    `download_dir` checks it: a key that could leave the folder (`..`, `.`, an empty segment) is refused."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        return sorted("/".join(parts) for parts in object_names(uri, path, fs.find(path)).values())
    out = []
    for root, _, files in os.walk(path):
        out += [os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/") for name in files]
    return sorted(out)


def copy_dir(src: str, dst: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file of a folder URI to another (local or S3, either way), streaming each (`copy_file`).
    Files whose relative name is in `skip` stay behind. Returns the relative names copied."""
    names = [n for n in list_files(src) if n not in skip]
    for name in names:
        copy_file(join(src, name), join(dst, name))
    return names


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to a URI folder (files keep their relative paths), streaming each file."""
    copy_dir(local_dir, uri)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a URI folder to a local folder (a no-op copy for local URIs returns the path itself).

    Every object must land inside `local_dir`: a key with a `..` or `.` segment (S3 keys are plain strings, so
    `model/../../home/x/.bashrc` is a valid key) is refused, naming it, before anything is written.
    """
    if not is_remote(uri):
        return filesystem(uri)[1]
    fs, path = filesystem(uri)
    download_objects(fs, uri, object_names(uri, path, fs.find(path)), local_dir)
    return local_dir


def object_names(uri: str, path: str, keys: list[str]) -> dict[str, list[str]]:
    """{object key: its path segments under the folder} for the objects of a folder listing; refuses any key whose
    segments could leave the folder."""
    base = path.rstrip("/") + "/"
    names: dict[str, list[str]] = {}
    for key in keys:
        rel = key[len(base):] if key.startswith(base) else None
        if rel is not None and (not rel or rel.endswith("/")):
            continue  # a zero-byte "folder" marker that some S3 tools create: nothing to copy
        parts = (rel or "").split("/")
        if rel is None or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
            raise DataError(f"{uri}: refusing to download object {key!r}: its key does not name a file inside the "
                            f"folder ('..', '.', an empty segment or a backslash)")
        names[key] = parts
    return names


def download_objects(fs: fsspec.AbstractFileSystem, uri: str, names: dict[str, list[str]], local_dir: str) -> None:
    """Download the objects `object_names` checked into `local_dir`, each to its own segments under it."""
    os.makedirs(local_dir, exist_ok=True)
    root = os.path.realpath(local_dir)
    for key, parts in names.items():
        dest = os.path.join(root, *parts)
        # Belt and braces beside the segment check: a symlink already in local_dir must not redirect a write.
        if os.path.commonpath([root, os.path.realpath(dest)]) != root:
            raise DataError(f"{uri}: refusing to download object {key!r} outside {local_dir}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _get_file(fs, key, dest)


def _get_file(fs: fsspec.AbstractFileSystem, path: str, dest: str) -> None:
    """An S3 object to a local file in `UPLOAD_CHUNK_BYTES` ranges, `UPLOAD_CONCURRENCY` at a time (s3fs's
    defaults hold ten 50 MB parts at once)."""
    fs.get_file(path, dest, chunksize=UPLOAD_CHUNK_BYTES, max_concurrency=UPLOAD_CONCURRENCY)

"""Storage URIs (local paths, `file://`, `s3://`) through fsspec/s3fs, with atomic writes and JSON records.

Every artifact is written to a temporary name and committed last: files by a rename (local) or by a single PUT of
the final object (S3, where an object is either fully there or absent), and folders by a record file (manifest.json,
lineage.json) that is written after everything else. A reader trusts a folder only when its record exists.

Credentials come only from the standard AWS chain (env, profile, IRSA web identity, instance role); this module
never reads or logs them. The endpoint comes from `StorageConfig.endpoint_url` or `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec

from llm_platform.config.storage import StorageConfig

_settings: dict[str, Any] = {"endpoint_url": None, "region": None, "retries": 8}


def configure(cfg: StorageConfig | dict | None) -> None:
    """Set the S3 endpoint/region/retries for this process, and export them so Ray workers inherit them."""
    if cfg is None:
        return
    data = cfg if isinstance(cfg, dict) else {"endpoint_url": cfg.endpoint_url, "region": cfg.region,
                                              "retries": cfg.retries}
    _apply(data)
    _filesystems.clear()  # a reconfigured process may hold other credentials too: build its clients again


def _apply(data: dict[str, Any]) -> None:
    _settings.update({k: data.get(k, _settings[k]) for k in _settings})
    if _settings["endpoint_url"]:
        os.environ["AWS_ENDPOINT_URL"] = _settings["endpoint_url"]
    if _settings["region"]:
        os.environ.setdefault("AWS_DEFAULT_REGION", _settings["region"])


@contextmanager
def using(driver_settings: dict[str, Any] | None) -> Iterator[None]:
    """Use these storage settings (from `settings()` on the driver) for a block, then restore the previous ones.

    For Ray tasks: a pooled worker process runs tasks of many stages and runs, and the endpoint its job started
    with may not be the one this run's driver uses, so a task takes the driver's settings as an argument and must
    not leave them behind for the next task. The clients stay cached, keyed by the settings they were built for
    (`filesystem`): building an S3 client costs a task about as much as reading a small file.
    """
    saved = dict(_settings), {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    if driver_settings is not None:
        _apply(driver_settings)
    try:
        yield
    finally:
        _settings.update(saved[0])
        for key, value in saved[1].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def settings() -> dict[str, Any]:
    """The storage settings in force (endpoint, region, retries) as a plain dict for Ray workers."""
    return {
        "endpoint_url": endpoint_url(),
        "region": _settings["region"] or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        "retries": _settings["retries"],
    }


def endpoint_url() -> str | None:
    """The S3 endpoint in force, if any."""
    return _settings["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://)."""
    return uri.startswith(("s3://", "s3a://"))


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


_filesystems: dict[tuple, Any] = {}  # clients by (kind, the settings they were built with)


def s3_options() -> dict[str, Any]:
    """Keyword arguments for `s3fs.S3FileSystem` with the configured endpoint, region and retries."""
    client_kwargs: dict[str, Any] = {}
    if endpoint_url():
        client_kwargs["endpoint_url"] = endpoint_url()
    region = settings()["region"]
    if region:
        client_kwargs["region_name"] = region
    return {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"retries": {"max_attempts": int(_settings["retries"]), "mode": "adaptive"}},
        # Listings are cached by default; our writers and readers interleave, so do not trust a stale listing.
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URI and the path inside it."""
    if is_remote(uri):
        key = ("s3", *settings().values())
        if key not in _filesystems:
            import s3fs

            _filesystems[key] = s3fs.S3FileSystem(**s3_options())
        return _filesystems[key], uri.split("://", 1)[1]
    if ("file",) not in _filesystems:
        _filesystems[("file",)] = fsspec.filesystem("file")
    return _filesystems[("file",)], os.path.abspath(os.path.expanduser(_strip_file(uri)))


def pyarrow_filesystem(uri: str):
    """A `pyarrow.fs` filesystem for Ray Data reads/writes, and the path inside it."""
    import pyarrow.fs as pafs

    if is_remote(uri):
        opts: dict[str, Any] = {}
        endpoint = endpoint_url()
        if endpoint:
            opts["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                opts["scheme"] = "http"
        region = settings()["region"]
        if region:
            opts["region"] = region
        key = ("pyarrow-s3", *sorted(opts.items()), int(_settings["retries"]))
        if key not in _filesystems:
            _filesystems[key] = _pyarrow_s3(opts, int(_settings["retries"]))
        return _filesystems[key], uri.split("://", 1)[1]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(_strip_file(uri)))


_RetryingS3FileSystem: Any = None


def _pyarrow_s3(options: dict[str, Any], max_attempts: int):
    """A `pyarrow.fs.S3FileSystem` that keeps its retry strategy when pickled.

    pyarrow's own `S3FileSystem.__reduce__` keeps the connection options but drops `retry_strategy`, so the copy
    that Ray Data and Ray Train ship to their workers (which do the reads, the parquet writes and the checkpoint
    uploads) would run with pyarrow's default strategy (3 attempts) instead of `retries` attempts. The subclass
    rebuilds itself through this function on the other side. It is defined on first use so that importing this module
    does not import pyarrow.
    """
    import pyarrow.fs as pafs

    global _RetryingS3FileSystem
    if _RetryingS3FileSystem is None:
        class RetryingS3FileSystem(pafs.S3FileSystem):
            def __reduce__(self):
                return _pyarrow_s3, (self.llmp_options, self.llmp_max_attempts)

        _RetryingS3FileSystem = RetryingS3FileSystem
    fs = _RetryingS3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
    fs.llmp_options, fs.llmp_max_attempts = dict(options), max_attempts
    return fs


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (posix separators for S3)."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(_strip_file(uri), *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under a folder URI; empty when it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def glob(pattern: str) -> list[str]:
    """URIs matching a glob (sorted), with the scheme kept."""
    fs, path = filesystem(pattern)
    matches = sorted(fs.glob(path))
    if is_remote(pattern):
        scheme = pattern.split("://", 1)[0]
        return [f"{scheme}://{m}" for m in matches]
    return matches


def info(uri: str) -> dict[str, Any]:
    """Size and a change marker (ETag for S3, mtime for local) for a file URI."""
    fs, path = filesystem(uri)
    return _file_info(uri, fs.info(path))


def files_info(uri: str, recursive: bool = False) -> list[dict[str, Any]]:
    """Every file matching a glob, or (`recursive`) under a folder, with `info`'s size and change marker, taken
    from the listing itself: on S3 one LIST request per 1,000 objects instead of a HEAD per file (a corpus of
    thousands of small files spent longer listing than reading). Sorted by URI; folders left out."""
    fs, path = filesystem(uri)
    found = fs.find(path, detail=True) if recursive else fs.glob(path, detail=True)
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return [_file_info(prefix + p, d) for p, d in sorted(found.items()) if d.get("type") != "directory"]


def _file_info(uri: str, details: dict[str, Any]) -> dict[str, Any]:
    marker = details.get("ETag") or details.get("etag") or details.get("mtime") or details.get("LastModified")
    return {"uri": uri, "size": int(details.get("size") or 0), "marker": str(marker).strip('"')}


@contextmanager
def open_read(uri: str, mode: str = "rb", compression: str | None = None) -> Iterator[IO]:
    """Open a URI for reading (compression: None, 'infer', 'gzip', 'zstd')."""
    fs, path = filesystem(uri)
    with fs.open(path, mode, compression=compression) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_whole(uri: str) -> bytes:
    """A whole object's bytes in one request. `read_bytes` on S3 asks for the object's size first (s3fs sends a HEAD
    to decide whether to fetch a large object in concurrent parts), which is one round trip more per small file:
    a corpus of many small files spends its time on exactly that."""
    if not is_remote(uri):
        return read_bytes(uri)
    fs, path = filesystem(uri)
    return fs.cat_file(path, start=0)  # a range from 0: one GET, no size check


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


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


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        fs, path = filesystem(uri)
        fs.makedirs(path, exist_ok=True)


def delete(uri: str, recursive: bool = True) -> None:
    """Remove a file or folder if present."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


# S3 multipart uploads and ranged downloads: parts of UPLOAD_CHUNK_BYTES, UPLOAD_CONCURRENCY in flight. What a copy
# holds in memory is about their product (plus the S3 client's own copies), whatever the file's size.
UPLOAD_CHUNK_BYTES = 8 * 2**20
UPLOAD_CONCURRENCY = 4


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two of local and S3, streaming: memory does not grow with the file's size.

    S3 to S3 is a server-side copy (CopyObject; multipart copy past 5 GB): no byte passes through this process.
    Local to S3 is a multipart upload (`UPLOAD_CHUNK_BYTES` parts, `UPLOAD_CONCURRENCY` in flight), S3 to local a
    chunked download; a local
    destination is written beside itself and renamed into place, so a reader never sees half a file.
    """
    import shutil

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
        return sorted("/".join(parts) for parts in _local_names(uri, path, fs.find(path)).values())
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
    _download_objects(fs, uri, _local_names(uri, path, fs.find(path)), local_dir)
    return local_dir


def _local_names(uri: str, path: str, keys: list[str]) -> dict[str, list[str]]:
    """{object key: its path segments under the folder} for the objects of a folder listing; refuses any key whose
    segments could leave the folder."""
    from llm_platform.errors import DataError

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


def _download_objects(fs: fsspec.AbstractFileSystem, uri: str, names: dict[str, list[str]], local_dir: str) -> None:
    from llm_platform.errors import DataError

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


def private_cache_dir(name: str) -> str:
    """`<tmp>/<name>-<uid>`, created mode 0700 and refused when another user owns it or others may write to it: a
    predictable folder in a shared /tmp must not let another local user plant files that we would then load."""
    from llm_platform.errors import StageError

    folder = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise StageError(f"cache folder {folder} is not a folder owned by this user and closed to others; remove it "
                         f"or pass another cache folder")
    return folder


def download_cached(uri: str, cache_dir: str, attempts: int = 3) -> str:
    """A local copy of the URI folder under `cache_dir`, keyed by its content, downloaded at most once per content.

    The key hashes the URI and every object's key, size and ETag, so a model re-uploaded to the same URI is
    fetched again. A copy is downloaded into a private temporary folder beside the cache entry and renamed into
    place only when complete (rename is atomic), so concurrent callers (two replicas on one node) never read files
    that another is still writing: the loser of the race drops its copy and uses the winner's. The folder is
    listed again after the download; if an object changed meanwhile, the copy is discarded and fetched anew.
    """
    import shutil

    from llm_platform.errors import StageError

    fs, path = filesystem(uri)
    for _ in range(attempts):
        key = _content_key(fs, uri, path)
        final = os.path.join(cache_dir, key)
        if os.path.isdir(final):
            return final
        os.makedirs(cache_dir, exist_ok=True)
        _remove_abandoned_partials(cache_dir)
        partial = tempfile.mkdtemp(prefix=f".{key}.partial-{os.getpid()}-", dir=cache_dir)
        try:
            _download_objects(fs, uri, _local_names(uri, path, fs.find(path)), partial)
            if _content_key(fs, uri, path) != key:
                continue  # re-uploaded while we copied: discard (finally) and start over
            try:
                os.rename(partial, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
            return final  # ours, or an identical copy another process renamed into place first
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    raise StageError(f"{uri} kept changing while it was downloaded ({attempts} attempts); retry once it is stable")


def _remove_abandoned_partials(cache_dir: str) -> None:
    """Delete the temporary download folders of processes that are gone (killed mid-download: `finally` never ran,
    and each such folder can hold most of a model). A folder names its process (`.<key>.partial-<pid>-<random>`);
    the cache is per node, so a pid that is not running here is gone. Folders of the old unnamed form are left."""
    import shutil

    for entry in os.scandir(cache_dir):
        _, sep, rest = entry.name.partition(".partial-")
        pid = rest.split("-", 1)[0]
        if not (sep and entry.name.startswith(".") and pid.isdigit() and entry.is_dir(follow_symlinks=False)):
            continue
        if not _process_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _content_key(fs: fsspec.AbstractFileSystem, uri: str, path: str) -> str:
    objects = fs.find(path, detail=True)
    if not objects:
        from llm_platform.errors import StageError

        raise StageError(f"{uri}: no such folder, or it is empty")
    listing = sorted((key, int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or "").strip('"'))
                     for key, info in objects.items())
    return fingerprint({"uri": uri, "objects": listing}, length=32)


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

"""Storage URIs (local paths, `file://`, `s3://`) through fsspec/s3fs: the one package that reads and writes them.

Every artifact is written to a temporary name and committed last (a rename locally, one PUT on S3), and a folder
is complete only once its record (manifest.json, lineage.json) exists, written after everything else. Callers
import the package (`from llm_platform import storage`) and use the names below; the modules hold one job each:

- `uri`: the S3 settings in force, the fsspec/pyarrow clients built from them, and plain operations on a URI
  (join, list, stat, read, delete).
- `records`: whole objects written atomically, create-only claims, JSON records, content hashes.
- `transfer`: streamed copies of files and folders, local and S3 either way; downloads that stay in their folder.
- `cache`: the per-user model cache, keyed by content and filled atomically.
"""

from llm_platform.storage.cache import download_cached, private_cache_dir
from llm_platform.storage.records import (
    file_sha256,
    fingerprint,
    read_json,
    write_bytes,
    write_json,
    write_new,
    write_text,
)
from llm_platform.storage.transfer import (
    UPLOAD_CHUNK_BYTES,
    UPLOAD_CONCURRENCY,
    copy_dir,
    copy_file,
    download_dir,
    list_files,
    upload_dir,
)
from llm_platform.storage.uri import (
    configure,
    delete,
    endpoint_url,
    exists,
    files_info,
    filesystem,
    glob,
    info,
    is_remote,
    isdir,
    join,
    listdir,
    makedirs,
    open_read,
    pyarrow_filesystem,
    read_bytes,
    read_text,
    read_whole,
    s3_options,
    settings,
    size,
    using,
)

__all__ = [
    "UPLOAD_CHUNK_BYTES", "UPLOAD_CONCURRENCY", "configure", "copy_dir", "copy_file", "delete", "download_cached",
    "download_dir", "endpoint_url", "exists", "file_sha256", "files_info", "filesystem", "fingerprint", "glob",
    "info", "is_remote", "isdir", "join", "list_files", "listdir", "makedirs", "open_read", "private_cache_dir",
    "pyarrow_filesystem", "read_bytes", "read_json", "read_text", "read_whole", "s3_options", "settings", "size",
    "upload_dir", "using", "write_bytes", "write_json", "write_new", "write_text",
]

"""One way to name storage: a local path or a URI (``s3://``, ``gs://``, ``hdfs://``, any fsspec protocol).

Everything in :mod:`revq_ray.data` resolves a location to a ``pyarrow.fs.FileSystem`` plus a path inside it,
because that is what ``ray.data.read_webdataset`` takes; protocols pyarrow does not know natively (e.g.
``memory://``, ``az://`` via adlfs) are wrapped from fsspec.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from revq_ray.runtime import absolute, is_uri

__all__ = [
    "StorageError",
    "check_location",
    "download_tree",
    "exists",
    "is_file",
    "is_uri",
    "join",
    "local_copy",
    "makedirs",
    "read_bytes",
    "resolve",
    "upload_tree",
    "write_bytes_atomic",
]

_NATIVE_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "file", "mock"}


def resolve(location: str | os.PathLike, filesystem: Any = None) -> tuple[Any, str]:
    """``location`` -> ``(pyarrow FileSystem, path inside it)``.

    ``filesystem`` may be a ``pyarrow.fs.FileSystem`` or an ``fsspec`` filesystem; when given, ``location``
    is a path inside it. Local paths are made absolute (Ray workers may run in another directory).
    """
    import pyarrow.fs as pafs

    loc = str(location)
    if filesystem is not None:
        if isinstance(filesystem, pafs.FileSystem):
            return filesystem, loc
        # An fsspec filesystem object.
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), loc
    if not is_uri(loc):
        return pafs.LocalFileSystem(), absolute(loc)
    scheme = loc.split("://", 1)[0].lower()
    if scheme in _NATIVE_SCHEMES:
        return pafs.FileSystem.from_uri(loc)
    try:
        import fsspec
    except ImportError as err:  # pragma: no cover - fsspec ships with ray[data]
        raise ValueError(
            f"{loc!r}: scheme {scheme!r} needs fsspec and its {scheme} plugin installed"
        ) from err
    try:
        fs, path = fsspec.core.url_to_fs(loc)
    except (ImportError, ValueError) as err:
        raise ValueError(f"{loc!r}: no filesystem for scheme {scheme!r} ({err})") from err
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def exists(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(fs: Any, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: Any, path: str) -> bytes:
    # compression=None: pyarrow would otherwise gunzip "*.gz" files behind our back.
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write to a temporary name beside ``path`` then move it into place, so readers see all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def makedirs(fs: Any, path: str) -> None:
    fs.create_dir(path, recursive=True)


# --------------------------------------------------------------------------------------------- object stores
class StorageError(ValueError):
    """A storage URI that cannot be used (endpoint unreachable, credentials refused, bucket missing). A
    ``ValueError`` so every CLI reports it as a usage error (exit 2) naming the URI, before any work."""


_HOW_S3 = (
    "S3 is configured the standard AWS way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile / "
    "instance role), AWS_DEFAULT_REGION, and for an S3-compatible server (MinIO, ...) "
    "AWS_ENDPOINT_URL=http://host:port"
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_location(location: str | os.PathLike, *, write: bool = False) -> None:
    """Fail fast, naming ``location``, when a URI's storage cannot be used: the endpoint does not answer, the
    credentials are refused, or the bucket does not exist; with ``write``, also when an object cannot be
    written there (a probe object is written and deleted). Local paths are not checked here (their callers
    create them). Takes seconds: pyarrow's S3 client gives up on a refused connection after its retries
    (about 6 s) and never falls back to the local disk."""
    import pyarrow.fs as pafs

    loc = str(location)
    if not is_uri(loc):
        return
    try:
        fs, path = resolve(loc)
    except (ValueError, OSError) as err:
        raise StorageError(f"{loc}: cannot open this storage URI ({_first_line(err)})") from None
    scheme = loc.split("://", 1)[0].lower()
    how = f" ({_HOW_S3})" if scheme == "s3" else ""
    bucket = path.strip("/").split("/", 1)[0]
    try:
        root = fs.get_file_info(bucket) if scheme in ("s3", "gs", "gcs") and bucket else None
    except OSError as err:
        raise StorageError(f"{loc}: storage refused or unreachable: {_first_line(err)}{how}") from None
    if root is not None and root.type == pafs.FileType.NotFound:
        raise StorageError(
            f"{loc}: bucket {bucket!r} does not exist (or these credentials cannot see it); create it first, "
            f"e.g. `aws s3 mb {scheme}://{bucket}`{how}"
        )
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{loc}: storage refused or unreachable: {_first_line(err)}{how}") from None
    if info.type == pafs.FileType.File:
        raise StorageError(f"{loc}: is a file, expected a folder (prefix)")
    if write:
        probe = join(path, f".revq-ray-write-probe-{uuid.uuid4().hex[:8]}")
        try:
            with fs.open_output_stream(probe) as f:
                f.write(b"probe")
            fs.delete_file(probe)
        except OSError as err:
            raise StorageError(f"{loc}: cannot write there: {_first_line(err)}{how}") from None


def upload_tree(local_dir: str | os.PathLike, location: str, *, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under ``local_dir`` to ``location`` (a URI or a path), keeping relative paths;
    top-level names in ``skip`` stay behind. Each file is written whole (object stores have no partial
    objects). Returns the number of files copied."""
    fs, root = resolve(location)
    base = Path(local_dir)
    n = 0
    for src in sorted(base.rglob("*")):
        rel = src.relative_to(base)
        if not src.is_file() or rel.parts[0] in skip:
            continue
        dst = join(root, rel.as_posix())
        if not is_uri(location):
            makedirs(fs, os.path.dirname(dst))
        with fs.open_output_stream(dst) as f:
            f.write(src.read_bytes())
        n += 1
    return n


def download_tree(
    location: str,
    local_dir: str | os.PathLike,
    *,
    only: tuple[str, ...] | None = None,
    skip_prefix: tuple[str, ...] = (),
) -> int:
    """Copy every file under ``location`` into ``local_dir`` (relative paths kept); with ``only``, just the
    files under those top-level names; top-level names starting with one of ``skip_prefix`` are left out.
    Returns the number of files copied (0 when ``location`` holds nothing)."""
    import pyarrow.fs as pafs

    fs, root = resolve(location)
    out = Path(local_dir)
    n = 0
    root = root.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        top = rel.split("/", 1)[0]
        if (only is not None and top not in only) or (skip_prefix and top.startswith(skip_prefix)):
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(read_bytes(fs, info.path))
        n += 1
    return n


def cache_dir(location: str, kind: str) -> Path:
    """A local folder that stands for ``location`` (a URI) on this machine:
    ``~/.cache/revq_ray/<kind>/<scheme>/<bucket/key...>``, plus a short hash of the endpoint so that two
    servers' buckets of one name never share it."""
    scheme, rest = location.split("://", 1)
    rest, _, query = rest.partition("?")
    endpoint = query + "|" + os.environ.get("AWS_ENDPOINT_URL", "")
    tag = hashlib.sha256(endpoint.encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "revq_ray" / kind / f"{scheme}-{tag}" / rest.strip("/")


def local_copy(
    location: str | os.PathLike, *, skip_prefix: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> Path:
    """A local folder holding the files of ``location``: the path itself when local, else a download of the
    URI under :func:`cache_dir`, in a folder named after a fingerprint of the listing (names, sizes, times):
    a newer upload gets a new folder, an unchanged one is reused, and a folder is only ever renamed into
    place whole, so processes of one node (Ray actors loading one model) never read a half-written or
    re-downloaded file. Top-level names starting with one of ``skip_prefix`` are left out; with ``only``,
    just those top-level names are fetched."""
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    loc = str(location)
    if not is_uri(loc):
        return Path(loc).expanduser()
    check_location(loc)
    fs, root = resolve(loc)
    root = root.rstrip("/")

    def wanted(path: str) -> bool:
        top = path[len(root) :].lstrip("/").split("/", 1)[0]
        return (only is None or top in only) and not (skip_prefix and top.startswith(skip_prefix))

    listing = sorted(
        (i.path, i.size, str(i.mtime))
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        if i.type == pafs.FileType.File and wanted(i.path)
    )
    if not listing:
        raise FileNotFoundError(f"{loc}: no files there")
    base = cache_dir(loc, "remote")
    dst = base / hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
    if dst.is_dir():
        return dst
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=base))
    try:
        download_tree(loc, tmp, skip_prefix=skip_prefix, only=only)
        try:
            tmp.rename(dst)
        except OSError:  # another process renamed the same download into place first
            if not dst.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst

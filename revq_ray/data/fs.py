"""One way to name storage: a local path or a URI (``s3://``, ``gs://``, ``hdfs://``, any fsspec protocol).

Everything in :mod:`revq_ray.data` resolves a location to a ``pyarrow.fs.FileSystem`` plus a path inside it,
because that is what ``ray.data.read_webdataset`` takes; protocols pyarrow does not know natively (e.g.
``memory://``, ``az://`` via adlfs) are wrapped from fsspec.
"""

from __future__ import annotations

import os
from typing import Any

from revq_ray.runtime import absolute, is_uri

__all__ = ["exists", "is_file", "is_uri", "join", "makedirs", "read_bytes", "resolve", "write_bytes_atomic"]

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

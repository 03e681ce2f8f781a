"""Where images and shards live: a local folder or `s3://bucket/prefix`, behind a few
functions (pyarrow's filesystems, already a dependency).

S3 credentials and region come from the usual AWS environment (variables, profile,
instance role); `AWS_ENDPOINT_URL` points at any S3-compatible server (MinIO, Ceph,
moto in the tests). An object appears whole or not at all, so "write the object" is
the commit that a rename is on a local disk.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def join(base: str | Path, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_remote(base) else str(Path(base, *parts))


@lru_cache(maxsize=None)
def _s3(endpoint: str | None, region: str | None):
    from pyarrow import fs

    kwargs = {"region": region or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return fs.S3FileSystem(**kwargs)


def _fs(uri: str | Path):
    """(pyarrow filesystem, path inside it)."""
    from pyarrow import fs

    if is_remote(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(endpoint, region), str(uri)[len("s3://"):].rstrip("/")
    return fs.LocalFileSystem(), str(Path(uri).resolve())


def exists(uri: str | Path) -> bool:
    from pyarrow import fs

    filesystem, path = _fs(uri)
    return filesystem.get_file_info(path).type == fs.FileType.File


def size(uri: str | Path) -> int:
    filesystem, path = _fs(uri)
    return filesystem.get_file_info(path).size


def open_random(uri: str | Path):
    """A seekable binary file over a local file or an object (read by ranges)."""
    if not is_remote(uri):
        return open(uri, "rb")  # noqa: SIM115 - the caller closes it
    filesystem, path = _fs(uri)
    return filesystem.open_input_file(path)


def read_bytes(uri: str | Path, offset: int = 0, length: int = -1) -> bytes:
    filesystem, path = _fs(uri)
    with filesystem.open_input_file(path) as fh:
        if offset:
            fh.seek(offset)
        return fh.read() if length < 0 else fh.read(length)


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Whole or nothing: a local file is written beside and renamed; an object is one PUT."""
    if not is_remote(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    filesystem, path = _fs(uri)
    with filesystem.open_output_stream(path) as out:
        out.write(data)


def upload(local: str | Path, uri: str) -> None:
    filesystem, path = _fs(uri)
    with open(local, "rb") as src, filesystem.open_output_stream(path) as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)


def listdir(uri: str | Path, recursive: bool = False) -> list[tuple[str, int]]:
    """(path relative to `uri`, size) of the files under `uri`, sorted; [] if none."""
    from pyarrow import fs

    filesystem, path = _fs(uri)
    infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted((i.path[len(path):].lstrip("/"), i.size) for i in infos if i.type == fs.FileType.File)


def copy_verified(uri: str, dest: Path, expect_bytes: int, expect_sha256: str) -> None:
    """Copy `uri` to `dest` through `dest.part`, hashing as it streams; the file takes its
    name only when size and SHA-256 match what was recorded when it was written."""
    filesystem, path = _fs(uri)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, n = hashlib.sha256(), 0
    with filesystem.open_input_stream(path) as src, open(part, "wb") as out:
        while chunk := src.read(8 << 20):
            digest.update(chunk)
            n += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if n != expect_bytes or digest.hexdigest() != expect_sha256:
        part.unlink()
        raise ValueError(f"{uri}: {n} bytes with SHA-256 {digest.hexdigest()[:12]}..., the manifest says "
                         f"{expect_bytes} bytes and {expect_sha256[:12]}...")
    os.replace(part, dest)


def digest(uri: str | Path) -> dict:
    """{"bytes", "sha256"} of a file or object, streamed."""
    filesystem, path = _fs(uri)
    h, n = hashlib.sha256(), 0
    with filesystem.open_input_stream(path) as src:
        while chunk := src.read(8 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


def data_hash(root: str | Path) -> str:
    """Content hash of what data_prep/shard.py wrote about a shard set (its manifest and
    classes): the retrain gate's `data_hash` and the digest of the MLflow dataset input."""
    h = hashlib.sha256()
    for name in ("manifest.parquet", "classes.json"):
        path = join(root, name)
        if not exists(path):
            raise FileNotFoundError(f"{path}: not found; is {root} the output of data_prep/shard.py?")
        h.update(name.encode())
        h.update(read_bytes(path))
    return h.hexdigest()

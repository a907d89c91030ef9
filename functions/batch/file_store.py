"""Where file contents live: a folder of the data dir, or any S3-compatible store through boto3.

Uploads, batch results and downloads go through one `FileStore`, so web nodes on different
machines share files when it is S3 (``FERRY_FILES_S3_BUCKET``). The calls block: run them in a
thread. A file's record (name, purpose, size, owner) is a stored object in Redis; this module
holds only the bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from shared.settings import Settings

CHUNK = 1 << 20
PART = 8 << 20  # an S3 upload's part


class FileStore(Protocol):
    def put(self, key: str, source: IO[bytes]) -> int:
        """Store `source` (read to its end) under `key`; returns its size."""

    def chunks(self, key: str) -> Iterator[bytes]:
        """The bytes under `key`, a piece at a time."""

    def delete(self, key: str) -> None: ...


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, source: IO[bytes]) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            size = out.tell()
        os.replace(tmp, self.root / key)  # whole or absent, never half written
        return size

    def chunks(self, key: str) -> Iterator[bytes]:
        with (self.root / key).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class S3Files:
    def __init__(self, settings: Settings) -> None:
        import boto3

        self.bucket = settings.files_s3_bucket
        self.prefix = settings.files_s3_prefix
        self.client: Any = boto3.client(
            "s3", endpoint_url=settings.files_s3_endpoint_url or settings.s3_endpoint_url,
            region_name=settings.s3_region)

    def put(self, key: str, source: IO[bytes]) -> int:
        """A multipart upload, one part at a time: memory holds one part, never the file."""
        target = {"Bucket": self.bucket, "Key": self.prefix + key}
        first = source.read(PART)
        if len(first) < PART:  # small: one request
            self.client.put_object(Body=first, **target)
            return len(first)
        upload = self.client.create_multipart_upload(**target)["UploadId"]
        parts: list[dict[str, Any]] = []
        size, data = 0, first
        try:
            while data:
                number = len(parts) + 1
                etag = self.client.upload_part(Body=data, PartNumber=number, UploadId=upload,
                                               **target)["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
                size += len(data)
                data = source.read(PART)
            self.client.complete_multipart_upload(UploadId=upload,
                                                  MultipartUpload={"Parts": parts}, **target)
        except Exception:
            self.client.abort_multipart_upload(UploadId=upload, **target)
            raise
        return size

    def chunks(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        yield from body.iter_chunks(CHUNK)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)


def file_store(settings: Settings) -> FileStore:
    if settings.files_s3_bucket:
        return S3Files(settings)
    return LocalFiles(settings.data_dir / "files")


def lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines (without their ends) of a file read a chunk at a time."""
    rest = b""
    for chunk in chunks:
        *whole, rest = (rest + chunk).split(b"\n")
        yield from whole
    if rest:
        yield rest

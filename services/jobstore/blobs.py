"""Audio blob storage behind a small interface. The default keeps files in a directory on the
jobstore's volume; an object store can implement the same four methods."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from services.shared.errors import LimitExceeded
from services.shared.spool import Spool

PIECE = 256 * 1024


class BlobStore(ABC):
    @abstractmethod
    async def write(self, key: str, pieces: AsyncIterator[bytes], *, max_bytes: int | None = None) -> int:
        """Store the pieces under key (atomically: all or nothing). Returns the size."""

    @abstractmethod
    def read(self, key: str, piece_size: int = PIECE) -> AsyncIterator[bytes]:
        """The blob in pieces. Raises FileNotFoundError if missing."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the blob (no error if missing)."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether the blob is stored."""

    @abstractmethod
    async def keys_older_than(self, seconds: float) -> list[str]:
        """Keys of blobs written more than `seconds` ago (for orphan sweeps)."""

    async def existing(self, keys: list[str]) -> set[str]:
        """The keys among `keys` whose blob is stored."""
        return {k for k in keys if await self.exists(k)}

    def close(self) -> None:  # noqa: B027 - optional
        """Release local resources (scratch space)."""


class FileBlobStore(BlobStore):
    def __init__(self, root: str) -> None:
        self.root = root
        # Uploads are written here first and renamed into place when whole; what a crash left in
        # .tmp is removed when the next process opens it, and by every sweep.
        self.tmp = os.path.join(root, ".tmp")
        self.spool = Spool(self.tmp, name="blobs").open()

    def close(self) -> None:
        self.spool.close()

    def path(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad blob key {key!r}")
        return os.path.join(self.root, key[:2], key)

    async def write(self, key: str, pieces: AsyncIterator[bytes], *, max_bytes: int | None = None) -> int:
        final = self.path(key)
        tmp = os.path.join(self.spool.dir, f"{key}.{uuid.uuid4().hex}")
        size = 0
        fh = await asyncio.to_thread(open, tmp, "wb")
        try:
            async for piece in pieces:
                size += len(piece)
                if max_bytes is not None and size > max_bytes:
                    raise LimitExceeded(
                        f"upload is over the {max_bytes} byte limit",
                        reason="AUDIO_TOO_LARGE",
                        field="audio_chunk",
                    )
                await asyncio.to_thread(fh.write, piece)
            await asyncio.to_thread(_flush_and_sync, fh)
            fh.close()
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
            return size
        except BaseException:
            fh.close()
            _unlink(tmp)
            raise

    async def read(self, key: str, piece_size: int = PIECE) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(open, self.path(key), "rb")
        try:
            while piece := await asyncio.to_thread(fh.read, piece_size):
                yield piece
        finally:
            fh.close()

    async def delete(self, key: str) -> None:
        _unlink(self.path(key))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(os.path.isfile, self.path(key))

    async def existing(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        return await asyncio.to_thread(lambda: {k for k in keys if os.path.isfile(self.path(k))})

    async def keys_older_than(self, seconds: float) -> list[str]:
        cutoff = time.time() - seconds

        def scan() -> list[str]:
            out = []
            for sub in os.scandir(self.root):
                if not sub.is_dir() or sub.name.startswith("."):
                    continue
                out += [f.name for f in os.scandir(sub.path) if f.is_file() and f.stat().st_mtime < cutoff]
            self.spool.sweep()  # interrupted uploads of processes that are gone
            return out

        return await asyncio.to_thread(scan)


def _flush_and_sync(fh: object) -> None:
    fh.flush()  # type: ignore[attr-defined]
    os.fsync(fh.fileno())  # type: ignore[attr-defined]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""Optional encryption at rest of stored audio and transcripts (AES-256-GCM). No grpc here.

STT_ENCRYPTION_KEY (32 bytes, base64) encrypts what the jobstore writes from then on: audio blobs,
chunk texts and segments, and job transcripts. STT_ENCRYPTION_OLD_KEYS (comma-separated) still
decrypt what older keys wrote, so a key can be rotated without a flag day. Data written before
encryption was turned on stays readable. Every sealed value names the key it was sealed with by a
short key id (not the key).

Blobs are sealed piece by piece, so audio streams in and out without being held in memory: a
header (magic, key id, random nonce prefix), then frames of [4-byte length][ciphertext + tag]. Each
frame's nonce is the prefix and its index; its associated data is the key id, its index and
whether it is the last frame, so frames cannot be reordered, dropped or the blob cut short
without the read failing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import AsyncIterable, AsyncIterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TEXT_PREFIX = "enc1:"
BLOB_MAGIC = b"STTENC1\n"
KID_BYTES = 8
NONCE_PREFIX_BYTES = 8


class SealError(Exception):
    """A sealed value could not be opened (wrong or missing key, or it was tampered with)."""


def parse_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("STT_ENCRYPTION_KEY must be base64 (e.g. `openssl rand -base64 32`)") from None
    if len(key) != 32:
        raise ValueError(f"STT_ENCRYPTION_KEY must be 32 bytes (base64 of 32 bytes), not {len(key)}")
    return key


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"stt-key-id:" + key).digest()[:KID_BYTES]


class Sealer:
    """Seals with the current key; opens with it or an old one. No key: passes data through."""

    def __init__(self, key: bytes | None = None, old_keys: list[bytes] | None = None) -> None:
        self.current = key
        self.kid = key_id(key) if key else b""
        self.keys = {key_id(k): AESGCM(k) for k in [*(old_keys or []), *([key] if key else [])]}

    @classmethod
    def from_settings(cls, key: str | None, old_keys: str | None) -> Sealer:
        old = [parse_key(k) for k in (old_keys or "").split(",") if k.strip()]
        return cls(parse_key(key) if key else None, old)

    @property
    def enabled(self) -> bool:
        return self.current is not None

    def _aead(self, kid: bytes) -> AESGCM:
        aead = self.keys.get(kid)
        if aead is None:
            raise SealError(f"data sealed with key {kid.hex()}, which is not configured")
        return aead

    # -- text --------------------------------------------------------------------------------------

    def seal_text(self, text: str | None) -> str | None:
        if text is None or not self.enabled:
            return text
        nonce = os.urandom(12)
        ct = self._aead(self.kid).encrypt(nonce, text.encode(), self.kid)
        return TEXT_PREFIX + base64.b64encode(self.kid + nonce + ct).decode()

    def open_text(self, value: str | None) -> str | None:
        if value is None or not value.startswith(TEXT_PREFIX):
            return value  # written before encryption was on
        raw = base64.b64decode(value[len(TEXT_PREFIX) :])
        kid, nonce, ct = raw[:KID_BYTES], raw[KID_BYTES : KID_BYTES + 12], raw[KID_BYTES + 12 :]
        try:
            return self._aead(kid).decrypt(nonce, ct, kid).decode()
        except InvalidTag:
            raise SealError("a sealed text failed authentication") from None

    # -- blobs -------------------------------------------------------------------------------------

    async def seal_stream(self, pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        if not self.enabled:
            async for piece in pieces:
                yield piece
            return
        aead, prefix = self._aead(self.kid), os.urandom(NONCE_PREFIX_BYTES)
        yield BLOB_MAGIC + self.kid + prefix
        index, held = 0, None
        async for piece in pieces:
            if not piece:
                continue
            if held is not None:
                yield _frame(aead, self.kid, prefix, index, held, last=False)
                index += 1
            held = piece
        yield _frame(aead, self.kid, prefix, index, held or b"", last=True)

    async def open_stream(self, raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The plaintext of a blob read in pieces (a blob written unsealed passes through)."""
        buf = b""
        it = aiter(raw)
        head_len = len(BLOB_MAGIC) + KID_BYTES + NONCE_PREFIX_BYTES
        async for piece in it:
            buf += piece
            if len(buf) >= head_len:
                break
        if not buf.startswith(BLOB_MAGIC):
            if buf:
                yield buf
            async for piece in it:
                yield piece
            return
        if len(buf) < head_len:
            raise SealError("sealed blob is cut short")
        kid = buf[len(BLOB_MAGIC) : len(BLOB_MAGIC) + KID_BYTES]
        prefix = buf[len(BLOB_MAGIC) + KID_BYTES : head_len]
        aead, buf, index, done = self._aead(kid), buf[head_len:], 0, False
        while True:
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                size = struct.unpack(">I", buf[:4])[0]
                ct, buf = buf[4 : 4 + size], buf[4 + size :]
                if done:
                    raise SealError("sealed blob has data after its last frame")
                plain, done = _open_frame(aead, kid, prefix, index, ct)
                index += 1
                if plain:
                    yield plain
            nxt = await anext(it, None)
            if nxt is None:
                break
            buf += nxt
        if buf or not done:
            raise SealError("sealed blob is cut short")


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _aad(kid: bytes, index: int, last: bool) -> bytes:
    return kid + struct.pack(">I?", index, last)


def _frame(aead: AESGCM, kid: bytes, prefix: bytes, index: int, plain: bytes, *, last: bool) -> bytes:
    ct = aead.encrypt(_nonce(prefix, index), plain, _aad(kid, index, last))
    return struct.pack(">I", len(ct)) + ct


def _open_frame(aead: AESGCM, kid: bytes, prefix: bytes, index: int, ct: bytes) -> tuple[bytes, bool]:
    for last in (False, True):
        try:
            return aead.decrypt(_nonce(prefix, index), ct, _aad(kid, index, last)), last
        except InvalidTag:
            continue
    raise SealError(f"sealed blob frame {index} failed authentication")

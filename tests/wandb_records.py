"""Read the records of a W&B offline transaction log (``run-<id>.wandb``), for tests.

The file layout, as written by wandb-core 0.31 (checked against files it wrote):

- a 7-byte file header: the ASCII ident ``:W&B``, the magic ``0xBEE1`` as a little-endian
  uint16 and a version byte (0);
- then a leveldb-style log: the file is cut into 32 KiB blocks (the file header counts as the
  start of block 0); each chunk has a 7-byte header, ``crc32`` (uint32 LE), ``length`` (uint16
  LE) and ``type`` (1 byte: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST), followed by ``length`` bytes.
  A record is one FULL chunk or FIRST, MIDDLE..., LAST. When fewer than 7 bytes are left in a
  block, they are zero padding and the next chunk starts at the next block.
- The CRC is the standard (IEEE, ``zlib.crc32``) CRC-32 of the type byte followed by the
  chunk's data (not the masked Castagnoli CRC of stock leveldb).

Each record's payload is a serialised ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_SIZE = 7
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0
FILE_HEADER_SIZE = 7

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptLog(ValueError):
    """The file is not a well-formed W&B transaction log."""


def _check_file_header(data: bytes) -> None:
    if len(data) < FILE_HEADER_SIZE:
        raise CorruptLog("file shorter than the 7-byte W&B header")
    ident, magic, version = struct.unpack("<4sHB", data[:FILE_HEADER_SIZE])
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise CorruptLog(f"bad W&B header: ident={ident!r} magic={magic:#x}")
    if version != FILE_VERSION:
        raise CorruptLog(f"unsupported W&B log version {version}")


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """Yield each record's payload bytes, in write order; raise CorruptLog on a bad CRC.

    A truncated final chunk (a writer killed mid-write) ends the iteration quietly, like a
    leveldb log reader in its default mode.
    """
    data = Path(path).read_bytes()
    _check_file_header(data)
    position = FILE_HEADER_SIZE
    pending: list[bytes] | None = None
    while position < len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_SIZE:
            position += left_in_block  # trailer padding
            continue
        if position + CHUNK_HEADER_SIZE > len(data):
            return
        crc, length, chunk_type = struct.unpack_from("<IHB", data, position)
        start = position + CHUNK_HEADER_SIZE
        end = start + length
        if chunk_type == 0 and length == 0 and crc == 0:
            # zero padding (a preallocated or padded tail): skip to the next block.
            position += left_in_block
            continue
        if end > len(data) or length > left_in_block - CHUNK_HEADER_SIZE:
            return
        chunk = data[start:end]
        expected = zlib.crc32(bytes([chunk_type]) + chunk)
        if crc != expected:
            raise CorruptLog(f"CRC mismatch at byte {position}: stored {crc:#010x}, computed {expected:#010x}")
        position = end
        if chunk_type == FULL:
            if pending is not None:
                raise CorruptLog(f"FULL chunk inside a fragmented record at byte {start}")
            yield chunk
        elif chunk_type == FIRST:
            if pending is not None:
                raise CorruptLog(f"FIRST chunk inside a fragmented record at byte {start}")
            pending = [chunk]
        elif chunk_type == MIDDLE:
            if pending is None:
                raise CorruptLog(f"MIDDLE chunk without FIRST at byte {start}")
            pending.append(chunk)
        elif chunk_type == LAST:
            if pending is None:
                raise CorruptLog(f"LAST chunk without FIRST at byte {start}")
            pending.append(chunk)
            yield b"".join(pending)
            pending = None
        else:
            raise CorruptLog(f"unknown chunk type {chunk_type} at byte {position}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_records(path: str | Path) -> list[Any]:
    return list(iter_records(path))


def find_log_files(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """Every ``run-<run_id>.wandb`` under ``wandb_dir`` (a resumed run writes one per session)."""
    return sorted(Path(wandb_dir).rglob(f"run-{run_id}.wandb"), key=lambda p: p.parent.name)

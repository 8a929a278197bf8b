"""copy-data keeps holes as holes, and is byte for byte the plain copy OpenSSH makes.

The bound itself (one request cannot turn a sparse source into a disk full of
zeros) is ``tests/test_fuzz.py::test_one_copy_data_cannot_write_far_more_than_the_client_sent``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.jail_support import CREATE, EXTENDED, READ, WRITE, RawSFTP, Refused, SFTPClientAPI, _string

MiB = 1024 * 1024


def _layout(path: str, extents: list[tuple[int, bytes]], size: int) -> None:
    """A file of ``size`` bytes whose only data are ``extents`` (offset, bytes); the rest holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)


def _expected(src: bytes, dst: bytes, read_offset: int, length: int, write_offset: int) -> bytes:
    """The plain copy: read the range, write it at the offset (holes read as zeros)."""
    piece = src[read_offset:] if length == 0 else src[read_offset:read_offset + length]
    out = bytearray(dst)
    if len(out) < write_offset:
        out.extend(bytes(write_offset - len(out)))
    out[write_offset:write_offset + len(piece)] = piece
    return bytes(out)


@pytest.fixture
def api(make_tunnel: Callable[..., Any], connect: Callable[..., Any], export_dir: str) -> SFTPClientAPI:
    client = connect(make_tunnel([export_dir]))
    channel = client.get_channel().get_transport().open_session()
    channel.invoke_subsystem("sftp")
    return SFTPClientAPI(RawSFTP(channel), export_dir)


def _copy(api: SFTPClientAPI, src: bytes, read_offset: int, length: int, dst: bytes, write_offset: int) -> int:
    payload = (_string("copy-data") + _string(src) + struct.pack(">QQ", read_offset, length) + _string(dst)
               + struct.pack(">Q", write_offset))
    try:
        api.raw.request(EXTENDED, payload)
    except Refused as e:
        return e.code
    return 0


# (source extents, source size, destination extents or None (absent), dst size, read off, length, write off)
CASES = {
    "data-hole-data into a new file": ([(0, b"a" * 5000), (3 * MiB, b"b" * 70000)], 4 * MiB, None, 0, 0, 0, 0),
    "trailing hole extends the size": ([(0, b"head")], 8 * MiB, None, 0, 0, 0, 0),
    "hole over existing data writes zeros": ([(0, b"x"), (2 * MiB, b"y")], 3 * MiB,
                                             [(0, b"D" * (3 * MiB))], 3 * MiB, 0, 0, 0),
    "a range with offsets, partly beyond the destination": ([(MiB, b"m" * 100000)], 4 * MiB,
                                                            [(0, b"old" * 1000)], 3000, MiB - 10, 2 * MiB, 1234),
    "source shorter than the length": ([(0, b"short")], 5, None, 0, 0, 100, 0),
    "read offset past the end": ([(0, b"abc")], 3, [(0, b"keep")], 4, 10, 0, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_copy_data_equals_the_plain_copy(api: SFTPClientAPI, export_dir: str, case: str) -> None:
    src_ext, src_size, dst_ext, dst_size, read_offset, length, write_offset = CASES[case]
    src_path, dst_path = os.path.join(export_dir, "src"), os.path.join(export_dir, "dst")
    _layout(src_path, src_ext, src_size)
    if dst_ext is not None:
        _layout(dst_path, dst_ext, dst_size)
    src_bytes = Path(src_path).read_bytes()
    dst_bytes = Path(dst_path).read_bytes() if dst_ext is not None else b""
    src = api.open(src_path, READ)
    dst = api.open(dst_path, WRITE | CREATE)
    code = _copy(api, src, read_offset, length, dst, write_offset)
    api.close(src)
    api.close(dst)
    short = length and read_offset + length > src_size
    assert code == (1 if short else 0), case  # SSH_FX_EOF when the source ends first
    got = Path(dst_path).read_bytes()
    assert got == _expected(src_bytes, dst_bytes, read_offset, length, write_offset), case


def test_copy_data_of_a_sparse_file_allocates_only_its_data(api: SFTPClientAPI, export_dir: str) -> None:
    src_path, dst_path = os.path.join(export_dir, "sparse"), os.path.join(export_dir, "copy")
    _layout(src_path, [(0, b"s" * 4096), (40 * MiB, b"e" * 4096)], 64 * MiB)
    src = api.open(src_path, READ)
    dst = api.open(dst_path, WRITE | CREATE)
    assert _copy(api, src, 0, 0, dst, 0) == 0
    assert os.path.getsize(dst_path) == 64 * MiB
    assert os.stat(dst_path).st_blocks * 512 <= 4 * MiB  # two data pages, not 64 MiB of zeros
    with open(src_path, "rb") as a, open(dst_path, "rb") as b:
        while True:
            x, y = a.read(MiB), b.read(MiB)
            assert x == y
            if not x:
                break

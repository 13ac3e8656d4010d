"""Small data files of every format the readers take, shared by the data tests."""

import io
import tarfile

import pytest
from PIL import Image

try:  # only the `hf` format needs pyarrow; without it just those tests are skipped
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed (pip install pyarrow)")


def img_bytes(i: int, fmt: str = "PNG", size=(12, 8), mode: str = "RGB") -> bytes:
    color = (i * 37 % 256, i * 11 % 256, 200) if mode == "RGB" else (i * 37 % 256, 0, 0, 128)
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, records):
    """records: list of (key, {ext: bytes}) written as consecutive members, as img2dataset does."""
    with tarfile.open(path, "w") as tar:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def image_cell(i, fmt="PNG"):
    return {"bytes": img_bytes(i, fmt), "path": None}


def image_struct():
    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])

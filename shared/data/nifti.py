"""Open a NIfTI file without trusting it: the header first, then only the bytes its shape accounts for.

A .nii.gz is a compressed stream: 1.7 MB of gzip decompresses to 1.7 GB of zeros, and the header's
dimensions can claim anything. Every byte here is read through a stream that refuses to go past a
limit: while the header and its extensions are parsed, `MAX_HEADER_BYTES`; for the voxels, exactly
what the header's shape and data type account for, once that shape is under the voxel cap. A file
holding more than that is refused too. So decompressing one file never costs more than
`max_voxels x bytes per voxel + header`, whatever the file says about itself.
"""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder

#: Voxels one volume may have (512^3; a BraTS volume has 240x240x155 = 8,928,000).
MAX_VOXELS = 512**3
#: Bytes before the voxel data (header + extensions); a plain NIfTI-1 file has 352.
MAX_HEADER_BYTES = 16 * 2**20
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_CLASSES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # by sizeof_hdr


class NiftiLimitError(ValueError):
    """The file needs more than a cap allows; the message says what it claims and the cap."""


class _LimitReached(Exception):
    """Raised by `_BoundedStream`; `BoundedNifti` turns it into a NiftiLimitError with context."""


class _BoundedStream(io.IOBase):
    """A read-only binary stream that never reads (decompresses) past byte `limit` of its source.

    An `io.IOBase` so nibabel uses it as it is; `read` is ours (RawIOBase's would allocate the
    requested size before any check).
    """

    def __init__(self, raw, limit: int, closes: tuple = ()):
        super().__init__()
        self._raw = raw
        self._closes = (raw, *closes)
        self.limit = limit
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("only absolute and relative seeks in a bounded NIfTI stream")
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        if offset > self.limit:
            raise _LimitReached(offset)
        self._pos = self._raw.seek(offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        room = self.limit - self._pos
        if size is None or size < 0:
            data = self._raw.read(room)
            if self._raw.read(1):
                raise _LimitReached(self.limit + 1)
        elif size > room:
            raise _LimitReached(self._pos + size)
        else:
            data = self._raw.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if len(view) > self.limit - self._pos:
            raise _LimitReached(self._pos + len(view))
        n = self._raw.readinto(view)
        self._pos += n
        return n

    def has_more(self) -> bool:
        """Whether the source holds bytes past the current position (reads at most one)."""
        return bool(self._raw.read(1))

    def close(self) -> None:
        for handle in self._closes:
            handle.close()
        super().close()


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _cap_text(max_voxels: int) -> str:
    side = round(max_voxels ** (1 / 3))
    return f"{max_voxels:,} voxels" + (f" ({side}^3)" if side**3 == max_voxels else "")


class BoundedNifti:
    """An open NIfTI file whose header has been read and checked; `read_*` then read its voxels once."""

    def __init__(self, path: Path, stream: _BoundedStream, image: nib.Nifti1Image, max_voxels: int):
        self.path = path
        self.image = image
        self._stream = stream
        proxy = image.dataobj  # what will be read: its shape, on-disk dtype and offset
        self.shape = tuple(int(s) for s in proxy.shape)
        self.dtype = np.dtype(proxy.dtype)
        self.offset = int(proxy.offset)
        if self.offset > MAX_HEADER_BYTES:
            raise NiftiLimitError(
                f"header puts the voxel data at byte {self.offset:,}, past the cap of {MAX_HEADER_BYTES:,} "
                "bytes for header and extensions; expected a NIfTI header of 352 bytes plus small extensions"
            )
        voxels = math.prod(self.shape)
        if voxels > max_voxels:
            raise NiftiLimitError(
                f"header claims shape {_shape_text(self.shape)} = {voxels:,} voxels, over the cap of "
                f"{_cap_text(max_voxels)} per volume; expected a BraTS-size volume (240x240x155 = "
                "8,928,000 voxels; a larger real volume needs a higher max_voxels)"
            )
        self.data_bytes = voxels * self.dtype.itemsize

    def _read(self, read) -> np.ndarray:
        self._stream.limit = self.offset + self.data_bytes
        try:
            data = read()
        except _LimitReached as reached:
            raise NiftiLimitError(
                f"reading the voxels needs byte {reached.args[0]:,}, past the {self._stream.limit:,} bytes its "
                f"header accounts for (shape {_shape_text(self.shape)}); expected a consistent NIfTI file"
            ) from None
        if self._stream.has_more():
            raise NiftiLimitError(
                f"holds more data than its header accounts for ({self._stream.limit:,} bytes: shape "
                f"{_shape_text(self.shape)} of {self.dtype} after a "
                f"{self.offset:,}-byte header); expected exactly that much (a damaged file or a decompression bomb)"
            )
        return data

    def read_image(self) -> np.ndarray:
        """Scaled intensities as float32, in the header's shape."""
        return self._read(lambda: self.image.get_fdata(dtype=np.float32, caching="unchanged"))

    def read_labels(self) -> np.ndarray:
        """The stored values (scaled if the header says so), in their own dtype."""
        return self._read(lambda: np.asanyarray(self.image.dataobj))


def _open_stream(path: Path, limit: int) -> _BoundedStream:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the bounded stream
    try:
        magic = raw.read(2)
        raw.seek(0)
    except BaseException:
        raw.close()
        raise
    if magic == _GZIP_MAGIC:  # GzipFile.close() leaves a file it was given open: close both
        return _BoundedStream(gzip.GzipFile(fileobj=raw, mode="rb"), limit, closes=(raw,))
    return _BoundedStream(raw, limit)


@contextmanager
def open_nifti(path: Path, *, max_voxels: int = MAX_VOXELS) -> Iterator[BoundedNifti]:
    """Read and check the header of a .nii or .nii.gz (compression is sniffed, not guessed from the name).

    Raises NiftiLimitError when a cap is exceeded, and whatever gzip or nibabel raise for a file that is
    not a readable NIfTI (OSError, EOFError, zlib.error, nibabel's HeaderDataError, ...).
    """
    path = Path(path)
    stream = _open_stream(path, MAX_HEADER_BYTES)
    try:
        head = stream.read(4)
        if len(head) < 4:
            raise EOFError(f"{len(head)} bytes, too short for a NIfTI header")
        sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
        klass = next((_HEADER_CLASSES[s] for s in sorted(sizes) if s in _HEADER_CLASSES), None)
        if klass is None:
            raise OSError(f"sizeof_hdr is {int.from_bytes(head, 'little')}; expected 348 (NIfTI-1) or 540 (NIfTI-2)")
        stream.seek(0)
        holder = FileHolder(filename=str(path), fileobj=stream)
        try:
            image = klass.from_file_map({"header": holder, "image": holder}, mmap=False)
        except _LimitReached:
            raise NiftiLimitError(
                f"header extensions run past {MAX_HEADER_BYTES:,} bytes, the cap for header and extensions; "
                "expected a NIfTI header of 352 bytes plus small extensions"
            ) from None
        yield BoundedNifti(path, stream, image, max_voxels)
    finally:
        stream.close()

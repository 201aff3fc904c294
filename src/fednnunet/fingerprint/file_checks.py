"""Checks of one image or label file below nnU-Net's reader, for faults the reader hides.

nnU-Net reads NIfTI with SimpleITK, which reads a ``.nii.gz`` cut short anywhere without an error (the missing
voxels become zeros) and NaN/Inf voxels as 0 (SimpleITK 2.5.7). Tried per format that nnU-Net reads (DESIGN.md,
``tests/test_file_checks.py``), and what is checked here:

========================  =======================================================  =================================
format (nnU-Net reader)   hidden by the reader                                      checked here
========================  =======================================================  =================================
.nii.gz (SimpleITKIO,     cut short (zeros), trailer missing, NaN/Inf read as 0;    gzip stream complete, CRC and
NibabelIO)                NibabelIO ignores a bad gzip CRC/length                   length; voxel bytes = header's;
                                                                                    NaN/Inf as stored
.nii (NibabelIO)          nothing (it raises on a short file, keeps NaN); read      voxel bytes = header's; NaN/Inf
                          with SimpleITK a short file becomes zeros                 as stored
.mha (SimpleITKIO)        damaged zlib data: "Uncompress failed" on stderr, wrong   zlib stream complete (Adler-32),
                          voxels, no error                                          size = header's
.gipl (SimpleITKIO)       cut short: read without error (garbage voxels)            file size = header + voxel bytes
.png (NaturalImage2DIO)   cut in its last bytes: last pixels read as 0              chunk CRCs, IDAT zlib stream
                                                                                    complete, IEND present
.nrrd (SimpleITKIO)       a damaged gzip length field only (voxels complete)        nothing: cuts, CRC errors and NaN
                                                                                    reach the reader
.bmp, .tif/.tiff          nothing: cuts raise, float TIFF keeps NaN                 nothing
========================  =======================================================  =================================

NaN and Inf of the formats whose reader keeps them (NRRD, MHA, GIPL, TIFF, .nii via nibabel) are reported by the
case check on the reader's arrays (:mod:`fednnunet.fingerprint.integrity`). Every check streams through the file
in bounded chunks (large 3D images are never held whole): one decompression pass verifies the stream and yields
the voxels that are scanned for NaN/Inf.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

READ_BYTES = 1 << 20  # compressed input per read
CHUNK_BYTES = 1 << 24  # decompressed output per step: bounds the memory a check holds
GZIP_MAGIC = b"\x1f\x8b"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIPL_HEADER_BYTES = 256


class FileFault(ValueError):
    """Faults of one file, one message each (the caller names the site, the case and the file)."""


def file_problems(path: str | Path) -> list[str]:
    """What is wrong with this image or label file below nnU-Net's reader; [] when nothing (or when its format
    needs no check below the reader, see the module docstring)."""
    check = checker_for(str(path))
    if check is None:
        return []
    try:
        check(Path(path))
    except FileFault as err:
        return [str(a) for a in err.args]
    except OSError as err:
        return [f"cannot be read ({type(err).__name__}: {err})"]
    return []


def checker_for(path: str) -> Callable[[Path], None] | None:
    """The check of the file's format (by nnU-Net's file ending), None for formats checked by the reader alone."""
    lower = path.lower()
    for ending, check in _CHECKS:
        if lower.endswith(ending):
            return check
    return None


# --- byte streams ------------------------------------------------------------------------------------------------
def _raw_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_BYTES):
        yield chunk


def _zlib_chunks(f: BinaryIO, first: bytes, gzip: bool, what: str) -> Iterator[bytes]:
    """Decompressed chunks of the stream that starts with ``first`` and goes on in ``f``; raises
    :class:`FileFault` when it is damaged, ends before its end marker, or has non-zero bytes after it.

    ``gzip``: gzip members (header, CRC-32 and length trailer, all verified by zlib), one after another as
    Python's gzip module reads them; else one zlib stream (Adler-32 verified)."""
    wbits = 16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    data = first
    while True:
        if not data:
            data = f.read(READ_BYTES)
            if not data:
                raise FileFault(f"cut short: its {what} stream ends after {f.tell()} bytes, before its end "
                                f"marker{' and trailer (CRC and length)' if gzip else ''} (an interrupted copy?)")
        try:
            out = d.decompress(data, CHUNK_BYTES)
        except zlib.error as err:
            raise FileFault(_zlib_message(err, what)) from None
        if out:
            yield out
        data = d.unconsumed_tail
        if d.eof:
            rest = d.unused_data
            if len(rest) < len(GZIP_MAGIC):  # what follows may start in the next read
                rest += f.read(READ_BYTES)
            if gzip and rest.startswith(GZIP_MAGIC):  # another member (as some tools write them)
                d, data = zlib.decompressobj(wbits), rest
                continue
            while rest:  # gzip readers allow zero padding after the stream, nothing else
                if rest.strip(b"\0"):
                    raise FileFault(f"data after the end of its {what} stream (damaged or overwritten)")
                rest = f.read(READ_BYTES)
            return


def _zlib_message(err: zlib.error, what: str) -> str:
    text = str(err)
    if "incorrect data check" in text:
        return f"damaged: its {what} {'CRC-32' if what == 'gzip' else 'Adler-32'} check failed"
    if "incorrect length check" in text:
        return f"damaged: the length in its {what} trailer does not match the data"
    return f"damaged {what} stream ({text})"


class _Reader:
    """Reads a byte stream made of chunks: a few bytes at a time (headers) or through to a count (voxels)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream)."""
        parts, size = [self._buf], len(self._buf)
        while size < n:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        joined = b"".join(parts)
        out, self._buf = joined[:n], joined[n:]
        return out

    def stream(self, n: int) -> Iterator[bytes]:
        """The next ``n`` bytes as chunks (fewer at the end of the stream)."""
        left = n
        while left > 0:
            chunk = self._buf or next(self._chunks, b"")
            if not chunk:
                return
            self._buf = chunk[left:]
            piece = chunk[:left]
            left -= len(piece)
            yield piece

    def drain(self) -> None:
        """Read to the end (which verifies a compressed stream's trailer)."""
        self._buf = b""
        for _ in self._chunks:
            pass


@dataclass
class _NonFinite:
    """NaN and Inf counts over a stream of voxel bytes of one dtype (chunks need not align with voxels)."""

    dtype: np.dtype
    nan: int = 0
    inf: int = 0
    _carry: bytes = b""

    def add(self, chunk: bytes) -> None:
        if self._carry:
            chunk = self._carry + chunk
        usable = len(chunk) - len(chunk) % self.dtype.itemsize
        self._carry = chunk[usable:]
        values = np.frombuffer(chunk, self.dtype, count=usable // self.dtype.itemsize)
        if values.dtype.kind == "c":
            values = values.view(values.real.dtype)
        finite = np.isfinite(values)
        if not finite.all():
            nan = int(np.isnan(values).sum())
            self.nan += nan
            self.inf += int(finite.size - finite.sum()) - nan

    def problems(self) -> list[str]:
        out = []
        if self.nan:
            out.append(f"{self.nan} NaN voxel(s) stored (SimpleITK, nnU-Net's NIfTI reader, reads them as 0)")
        if self.inf:
            out.append(f"{self.inf} infinite voxel(s) stored (SimpleITK, nnU-Net's NIfTI reader, reads them as 0)")
        return out


def _voxel_bytes_missing(read: int, expected: int, header: str) -> FileFault:
    return FileFault(f"holds {read} of the {expected} bytes of voxel data its {header} describes "
                     f"({100 * read / expected:.1f} %): cut short, or the header is wrong")


# --- NIfTI -----------------------------------------------------------------------------------------------------
def check_nifti(path: Path) -> None:
    """A single-file NIfTI-1/2 (``.nii`` or ``.nii.gz``): the gzip stream complete and intact, the voxel data as
    long as the header says, no NaN/Inf stored. Raises :class:`FileFault` with everything found."""
    import nibabel as nib

    problems: list[str] = []
    non_finite: _NonFinite | None = None
    with path.open("rb") as f:
        first = f.read(READ_BYTES)
        compressed = first.startswith(GZIP_MAGIC)  # an uncompressed file named .nii.gz reads fine everywhere
        reader = _Reader(_zlib_chunks(f, first, True, "gzip") if compressed else _chained(first, _raw_chunks(f)))
        try:
            head = reader.read(540)
            header = _nifti_header(nib, head)
            dtype = header.get_data_dtype()
            expected = math.prod(header.get_data_shape()) * dtype.itemsize
            offset = int(header.get_data_offset())
            if offset < header.sizeof_hdr:
                raise FileFault(f"malformed NIfTI header: its voxel data offset {offset} lies inside the header")
            non_finite = _NonFinite(dtype) if dtype.kind in "fc" else None
            if offset > len(head):
                reader.read(offset - len(head))  # header extensions
            first_voxels = head[offset:offset + expected]  # those that came with the 540 header bytes
            got = 0
            for chunk in _chained(first_voxels, reader.stream(expected - len(first_voxels))):
                got += len(chunk)
                if non_finite:
                    non_finite.add(chunk)
            if got < expected:
                raise _voxel_bytes_missing(got, expected, "NIfTI header")
            reader.drain()  # the rest of a gzip stream: its trailer is checked at its end
        except FileFault as err:
            problems.append(str(err))
    if non_finite:
        problems = non_finite.problems() + problems
    if problems:
        raise FileFault(*problems)


def _chained(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _nifti_header(nib, head: bytes):
    """nibabel's header of a single-file NIfTI-1 or NIfTI-2 from its first bytes."""
    if len(head) < 348:
        raise FileFault(f"only {len(head)} bytes, less than a NIfTI header: cut short")
    sizeof_hdr = {struct.unpack(f"{e}i", head[:4])[0] for e in "<>"}
    klass = nib.Nifti1Header if 348 in sizeof_hdr else nib.Nifti2Header if 540 in sizeof_hdr else None
    if klass is None:
        raise FileFault("not a NIfTI file (its header size field is neither 348 nor 540)")
    if klass is nib.Nifti2Header and len(head) < 540:
        raise FileFault(f"only {len(head)} bytes, less than a NIfTI-2 header: cut short")
    try:
        header = klass.from_fileobj(io.BytesIO(head))
    except Exception as err:  # nibabel raises HeaderDataError and others for malformed headers
        raise FileFault(f"malformed NIfTI header ({type(err).__name__}: {err})") from None
    if header["magic"].item() not in (b"n+1", b"n+2"):
        raise FileFault(f"not a single-file NIfTI (magic {header['magic'].item()!r})")
    return header


# --- formats read by SimpleITK besides NIfTI -----------------------------------------------------------------------
def _sitk_voxel_bytes(path: Path) -> int | None:
    """Bytes of voxel data SimpleITK expects from the file's header; None if it cannot parse it (the reader's own
    check then reports the file as unreadable)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    component = sitk.Image([1] * len(size), reader.GetPixelID()).GetSizeOfPixelComponent()
    return math.prod(size) * reader.GetNumberOfComponents() * component


def check_metaimage(path: Path) -> None:
    """A MetaImage with its data in the file (``ElementDataFile = LOCAL``): compressed data one complete, intact
    zlib stream of the header's size; uncompressed data as long as the header says."""
    with path.open("rb") as f:
        head = f.read(READ_BYTES)
        fields, offset = _metaimage_header(head)
        if fields.get("elementdatafile", "").lower() != "local":
            return  # data in another file: the reader reads it and reports what it cannot
        expected = _sitk_voxel_bytes(path)
        if expected is None:
            return
        compressed = fields.get("compresseddata", "false").lower() == "true"
        f.seek(offset)
        chunks = _zlib_chunks(f, b"", False, "zlib") if compressed else _raw_chunks(f)
        reader = _Reader(chunks)
        got = sum(len(c) for c in reader.stream(expected))
        if got < expected:
            raise _voxel_bytes_missing(got, expected, "MetaImage header")
        if compressed:
            reader.drain()


def _metaimage_header(head: bytes) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields (keys lower case) up to ``ElementDataFile``, and where the data start."""
    fields: dict[str, str] = {}
    pos = 0
    while True:
        end = head.find(b"\n", pos)
        if end < 0:
            raise FileFault("no complete MetaImage header (no ElementDataFile line): cut short?")
        key, _, value = head[pos:end].decode("latin-1").partition("=")
        fields[key.strip().lower()] = value.strip()
        pos = end + 1
        if key.strip().lower() == "elementdatafile":
            return fields, pos


def check_gipl(path: Path) -> None:
    """A GIPL file (uncompressed): as long as its 256-byte header plus the voxel data it describes."""
    expected = _sitk_voxel_bytes(path)
    if expected is None:
        return
    got = path.stat().st_size - GIPL_HEADER_BYTES
    if got < expected:
        raise _voxel_bytes_missing(max(got, 0), expected, "GIPL header")


# --- PNG ------------------------------------------------------------------------------------------------------------
def check_png(path: Path) -> None:
    """A PNG: every chunk complete with a matching CRC, the image data one complete zlib stream, IEND at the end."""
    with path.open("rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise FileFault("not a PNG file (no PNG signature)")
        image_data = zlib.decompressobj()
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise FileFault("cut short: it ends before its IEND chunk (an interrupted copy?)")
            length, kind = struct.unpack(">I4s", head)
            body = f.read(length)
            crc = f.read(4)
            if len(body) < length or len(crc) < 4:
                raise FileFault(f"cut short inside its {kind.decode('latin-1')} chunk (an interrupted copy?)")
            if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
                raise FileFault(f"damaged: its {kind.decode('latin-1')} chunk's CRC check failed")
            if kind == b"IDAT":
                try:
                    while body:
                        image_data.decompress(body, CHUNK_BYTES)
                        body = image_data.unconsumed_tail
                except zlib.error as err:
                    raise FileFault(f"damaged image data ({err})") from None
            elif kind == b"IEND":
                break
        if not image_data.eof:
            raise FileFault("its image data end before their end marker (cut short when written?)")


_CHECKS: tuple[tuple[str, Callable[[Path], None]], ...] = (
    (".nii.gz", check_nifti), (".nii", check_nifti), (".mha", check_metaimage), (".gipl", check_gipl),
    (".png", check_png),
)

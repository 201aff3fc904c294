"""Faults of image files written the way they happen (an interrupted copy, a tool that writes NaN, a damaged
trailer, a header that claims more than the file holds), shared by the tests of the data checks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def cut(path: Path, fraction: float) -> None:
    """An interrupted copy: the first ``fraction`` of the bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def drop_trailer(path: Path) -> None:
    """A gzip file whose last 8 bytes (CRC-32 and length) never arrived."""
    path.write_bytes(path.read_bytes()[:-8])


def flip_trailer_byte(path: Path, index: int) -> None:
    """A damaged gzip trailer: one byte of its CRC-32 (index -8..-5) or length (-4..-1) changed."""
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def replace_voxels(path: Path, change, dtype=None) -> None:
    """Rewrite a NIfTI's voxels as a tool that does not check would (nibabel writes NaN/Inf as they are)."""
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(change(data if dtype is None else data.astype(dtype)), img.affine), path)


def store_non_finite(path: Path, values: list[float], dtype=np.float32) -> None:
    """NaN/Inf written as float voxels, the first ones of the file."""
    def change(data: np.ndarray) -> np.ndarray:
        data.flat[: len(values)] = values
        return data
    replace_voxels(path, change, dtype)


def overclaim(path: Path) -> None:
    """An uncompressed .nii whose header claims one more row of voxels than the file holds."""
    with path.open("r+b") as f:
        header = nib.Nifti1Header.from_fileobj(f)
        shape = list(header.get_data_shape())
        shape[0] += 1
        header.set_data_shape(shape)
        f.seek(0)
        f.write(header.binaryblock)

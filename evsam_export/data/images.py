"""Image files as `evsam-export predict` and the runtime read them, one at a time or a whole folder.

`read_image_file` turns any file Pillow opens (grayscale, RGBA, palette, 16/32-bit, CMYK, EXIF-rotated)
into HxWx3 uint8 RGB through model/processing.py's conversion rules, so a parity suite, a calibration set
and `predict` see the same pixels. `ImageFolder` is a folder of such files (PNG, JPEG, TIFF, BMP, WebP;
recursive by default) with an optional deterministic sample (`limit`, `seed`); `read_folder` yields the
images one by one and skips a file it cannot read with its reason, so a caller can warn and count it.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export.errors import UsageError
from evsam_export.files import sha256_file
from evsam_export.model.processing import as_rgb_uint8, integer_to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# Pixels are copied out of Pillow in row bands of about this many bytes: np.asarray(image) would first make
# a bytes copy of the whole image, so a large photo would briefly be held three times.
READ_BAND_BYTES = 32 * 2**20


# ------------------------------------------------------------------------------------------ one file


def read_image_file(path: Path | str) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; a file that is missing, not an image or truncated raises
    UsageError with one line naming it."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"image not found: {path}")
    if path.is_dir():
        raise UsageError(f"image is a directory: {path}", hint="pass an image file")
    # Pillow warns (a raw multi-line warning) between its bomb threshold and twice it, and refuses above; the
    # warning becomes one `warning:` line so the user sees why the run is slow and memory-hungry.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as opened:
                opened.load()
                ImageOps.exif_transpose(opened, in_place=True)  # in place: no second copy of the pixels
                image = opened
        except UnidentifiedImageError:
            raise UsageError(
                f"cannot read image {path}: not an image file Pillow can read", hint="use PNG, JPEG, BMP, TIFF or WebP"
            ) from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot read image {path}: {detail}", hint="is the file complete and a supported format?") from None
    _report_large_image(path, caught)
    mode = image.mode
    if mode in ("L", "RGB", "RGBA"):
        array = _pixels_by_rows(image)
    elif mode == "P":
        array = np.asarray(image.convert("RGBA" if "transparency" in image.info else "RGB"))
    elif mode.startswith("I"):  # 16/32-bit integer grayscale: the runtime's integer rule
        array = integer_to_uint8(np.asarray(image))
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
    elif mode in ("1", "LA", "La"):
        array = np.asarray(image.convert("L"))
    else:  # CMYK, YCbCr, LAB, HSV, ...
        array = _pixels_by_rows(image.convert("RGB"))
    try:
        return as_rgb_uint8(array)
    except ValueError as exc:
        raise UsageError(f"cannot use image {path}: {exc}") from None


def _pixels_by_rows(image) -> np.ndarray:
    """np.asarray(image) for 8-bit modes (L, RGB, RGBA), copied in row bands so no whole-image bytes copy is made."""
    width, height = image.size
    channels = len(image.getbands())
    band = max(1, READ_BAND_BYTES // max(1, width * channels))
    shape = (height, width) if channels == 1 else (height, width, channels)
    array = np.empty(shape, np.uint8)
    for start in range(0, height, band):
        stop = min(start + band, height)
        array[start:stop] = np.asarray(image.crop((0, start, width, stop)))
    return array


def _report_large_image(path: Path, caught: list) -> None:
    """One `warning:` line for Pillow's DecompressionBombWarning (other warnings are passed on unchanged)."""
    import warnings

    from PIL import Image

    bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    for other in caught:
        if other not in bombs:
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if bombs:
        limit = Image.MAX_IMAGE_PIXELS or 0
        print(f"warning: {path} is above {limit / 1e6:.0f} megapixels (Pillow's decompression-bomb threshold); "
              f"reading it anyway, images above {2 * limit / 1e6:.0f} megapixels are refused", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ folders


@dataclass(frozen=True)
class FolderImage:
    name: str  # path relative to the folder, with forward slashes
    path: Path
    rgb: np.ndarray  # HxWx3 uint8


@dataclass(frozen=True)
class SkippedImage:
    name: str  # path relative to the folder
    reason: str  # the reader's one-line message

    def to_json(self) -> dict:
        return {"file": self.name, "reason": self.reason}


@dataclass(frozen=True)
class ImageFolder:
    """A folder of images: every file with an image suffix (dot-files and dot-folders left out), in sorted
    order of relative path; `limit` keeps a sample of that many drawn with `seed`, still in sorted order."""

    folder: Path
    limit: int | None = None
    seed: int = 0
    recursive: bool = True

    @property
    def name(self) -> str:
        return self.folder.name or str(self.folder)

    def all_files(self) -> list[str]:
        """Every image file's path relative to the folder (sorted); UsageError when the folder is missing or
        holds no image."""
        folder = self.folder
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "not found"
            raise UsageError(f"image folder {what}: {folder}", hint="pass a folder of PNG/JPEG/TIFF/BMP/WebP images")
        candidates = folder.rglob("*") if self.recursive else folder.iterdir()
        names = sorted(
            path.relative_to(folder).as_posix() for path in candidates
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )
        if not names:
            depth = "or its subfolders " if self.recursive else ""
            raise UsageError(f"no images in {folder} {depth}({', '.join(IMAGE_SUFFIXES)})",
                             hint="point at a folder of images")
        return names

    def files(self) -> list[str]:
        """The files this folder contributes: all of them, or a sample of `limit` drawn with `seed`."""
        names = self.all_files()
        if self.limit is None or self.limit >= len(names):
            return names
        picks = np.random.default_rng([self.seed, 0x1A6E]).choice(len(names), size=self.limit, replace=False)
        return [names[index] for index in sorted(picks)]

    def fingerprint(self) -> str:
        """sha256 over every image file's relative path, size and modification time (not only the sample):
        it changes when a file is added, removed, renamed or rewritten, without reading the pixels."""
        digest = hashlib.sha256(b"evsam-image-folder-v1")
        digest.update(f"|{self.limit}|{self.seed}|{self.recursive}".encode())
        for name in self.all_files():
            stat = (self.folder / name).stat()
            digest.update(f"|{name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


def read_folder(folder: ImageFolder) -> Iterator[FolderImage | SkippedImage]:
    """The folder's images one at a time (never the whole set in memory): a FolderImage per readable
    file, a SkippedImage (with the reason) per unreadable or truncated one."""
    for name in folder.files():
        try:
            rgb = read_image_file(folder.folder / name)
        except UsageError as error:
            yield SkippedImage(name, error.message)
        else:
            yield FolderImage(name, folder.folder / name, rgb)


def files_sha256(folder: Path, names: list[str]) -> str:
    """sha256 of the sorted list of `relative path  sha256(content)` lines: which files were used, by content."""
    lines = "".join(f"{name}  {sha256_file(Path(folder) / name)}\n" for name in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()

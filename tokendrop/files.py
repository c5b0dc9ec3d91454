"""The files the tools read and write, handled one way everywhere:

- `open_image`: an image file decoded to RGB, refusing what is not a regular file (opening a
  FIFO or a device can wait for ever) and decompression bombs (PIL's pixel limit), with an
  error that names the file; `decode_image` does the same for bytes already read;
- `image_digest`: what identifies the image files a run reads, by content;
- `writable_folder`: an output folder, made and tried before anything runs;
- `locked`: an output folder held by one process at a time.

Nothing here imports torch: the command line opens images while it parses its arguments.
"""

from __future__ import annotations

import hashlib
import io
import stat
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from PIL import Image

from .checks import MissingInputError, UsageError


def regular_file(path: str | Path) -> Path:
    """`path`, once it is known to be a regular file: anything else fails with ValueError
    (FileNotFoundError where nothing is there) before it is opened."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MissingInputError(f"image {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file (a folder, FIFO or device): an image must be a file")
    return path


def open_image(path: str | Path) -> Image.Image:
    """The image file at `path`, decoded to RGB (see `decode_image`)."""
    path = regular_file(path)
    return decode_image(path, str(path))


def decode_image(source, name: str) -> Image.Image:
    """`source` (a path, a binary file object or bytes) decoded to RGB now, so that a damaged
    file fails here, naming the image as `name`: OSError for an unreadable file, ValueError
    for one with more pixels than PIL allows (`PIL.Image.MAX_IMAGE_PIXELS`)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    bomb = (
        f"image {name} has more pixels than PIL's limit of {Image.MAX_IMAGE_PIXELS} (its guard against "
        "decompression bombs): use a smaller image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
    )
    try:
        with Image.open(source) as image:
            if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise UsageError(bomb)
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise UsageError(bomb) from None
    except (OSError, SyntaxError) as error:  # PIL's errors for unknown, damaged or truncated files
        raise OSError(f"cannot read image {name}: {error}") from None


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (hashlib.file_digest is 3.11+)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def image_digest(paths: Iterable[str | Path]) -> str:
    """A hash of the contents of the image files at `paths`, in order: what a run read, so
    that a changed image is a changed run. A path that is not a regular file (missing, a
    FIFO) is hashed as such and never opened: its sample fails when it runs."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path).expanduser()
        try:
            content = file_digest(regular_file(path))
        except (OSError, ValueError) as error:
            content = type(error).__name__
        digest.update(f"{path}\x00{content}\x00".encode())
    return digest.hexdigest()[:16]


@contextmanager
def locked(lock: Path, busy: str):
    """Hold the lock file `lock` for the block, or fail at once with UsageError(`busy`) when
    another process holds it. The operating system's file locks (filelock: flock on POSIX,
    msvcrt on Windows): they go with the process when it dies."""
    file_lock = FileLock(lock)
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(busy) from None
    try:
        yield
    finally:
        file_lock.release()


def writable_folder(out) -> Path:
    """`out`, created, once a file could be made in it: results are written there only after
    the work, and a folder that cannot take them must fail before it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise UsageError(f"cannot write to {out}: {error.strerror or error}; pick a folder you can write") from None
    return out

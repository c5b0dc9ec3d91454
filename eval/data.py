"""Where benchmark rows come from, and how their images are decoded.

A source is a local path or a hub dataset id:

- a directory written by `datasets`' `save_to_disk` (a `Dataset` or a `DatasetDict`, whose
  split is then picked): needs `datasets`;
- a parquet file, or a directory of them as the hub stores a dataset
  (`data/validation-00000-of-00002.parquet`: the files named after the split, inside the
  config's folder when there is one): read with pyarrow, which `datasets` installs;
- a JSONL file, or a directory of them (same split rule): plain Python; image paths in it are
  relative to the file's directory;
- anything else is a hub id, loaded with `datasets.load_dataset` (network or the hub cache).

Local parquet and JSONL files are read directly, not through `datasets.load_dataset("parquet" /
"json")`: that would copy each file into the datasets cache (a local snapshot can be many GB;
pyarrow memory-maps it instead), make `datasets` a requirement of a custom JSONL task, and
report a bad line as a failed "dataset generation" at a row number rather than the file's line.

Images stay undecoded until `open_image`, so that a corrupt one fails its own sample only.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import files
from ..checks import MissingInputError, MissingPackageError, UsageError

INSTALL_DATASETS = "pip install 'tokendrop[sweep]' (or pip install datasets)"


class ArrowRows(Sequence):
    """Rows of a pyarrow table as dicts, converted one at a time."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()


def column(rows, name: str) -> list:
    """One column of any row source, without touching the others (images stay unread)."""
    if isinstance(rows, list):
        return [row[name] for row in rows]
    if isinstance(rows, ArrowRows):
        return rows.column(name)
    return list(rows[name])  # a datasets.Dataset


def load_rows(source: str | Path, split: str, config: str | None = None):
    """(rows, root): a sequence of dict rows and the directory relative image paths start from
    (None for the hub)."""
    path = Path(source).expanduser()
    if not path.exists():
        if _only_a_path(str(source)):
            raise MissingInputError(f"{source}: no such local file or folder (a hub dataset id is NAME or ORG/NAME)")
        return _from_hub(str(source), split, config), None
    if config and (path / config).is_dir():  # a hub snapshot holding several configs
        path = path / config
    root = path if path.is_dir() else path.parent
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return _from_disk(path, split), root
    files = _split_files(path, split)
    if files[0].suffix == ".parquet":
        return _from_parquet(files), root
    return [row for file in files for row in _read_jsonl(file)], root


def _only_a_path(source: str) -> bool:
    """Whether a source that does not exist can only have been meant as a local path (a typo,
    not a hub id): it starts at a folder (/, ., ~), has more than one /, ends in a data file's
    suffix, or its first part is a local folder (data/textvqa beside a folder data/)."""
    path = Path(source)
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or path.suffix in (".jsonl", ".json", ".parquet", ".arrow", ".csv")
        or (path.parent != Path(".") and path.parent.is_dir())
    )


def _split_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        if path.suffix not in (".parquet", ".jsonl"):
            raise UsageError(f"{path}: expected a .parquet or .jsonl file, or a directory of them")
        return [path]
    for suffix in (".parquet", ".jsonl"):
        files = sorted(path.rglob(f"*{suffix}"))
        named = [f for f in files if f.name.split("-")[0].split(".")[0] == split or split in f.parent.parts]
        if named or len(files) == 1:
            return named or files
        if files:  # never mix splits silently
            raise UsageError(
                f"{path} holds {len(files)} {suffix} files, none named after split {split!r} "
                f"({split}-*{suffix} or a {split}/ folder): point at one file, or a folder of that split only"
            )
    raise UsageError(f"{path} holds no dataset: expected a save_to_disk directory, .parquet files or .jsonl files")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(
                        f'{path}, line {number}: expected a JSON object ({{"image": ..., '
                        f'"question": ...}}), got a {type(row).__name__}'
                    )
                rows.append(row)
    return rows


def _from_parquet(files: list[Path]) -> ArrowRows:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackageError(f"reading parquet needs pyarrow: {INSTALL_DATASETS}") from None
    return ArrowRows(pa.concat_tables([pq.read_table(f, memory_map=True) for f in files]))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise MissingPackageError(f"this data source needs the `datasets` package: {INSTALL_DATASETS}") from None
    return datasets


def _undecoded(dataset):
    """The dataset with its image columns left as {bytes, path}: decoded later, per sample."""
    datasets = _datasets()
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _from_disk(path: Path, split: str):
    datasets = _datasets()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UsageError(f"{path} has splits {', '.join(loaded)}, not {split!r}")
        loaded = loaded[split]
    return _undecoded(loaded)


def _from_hub(name: str, split: str, config: str | None):
    datasets = _datasets()
    try:
        return _undecoded(datasets.load_dataset(name, config, split=split))
    except Exception as error:  # the hub's own errors are many; say what was tried
        raise UsageError(
            f"{name!r} is not a local path, and loading it from the hub (config {config!r}, split {split!r}) "
            f"failed: {type(error).__name__}: {error}. Offline, pass a local copy with --data TASK=PATH"
        ) from error


def fingerprint(source: str | None) -> str | None:
    """What identifies a local source's contents: the name, size and modification time of each
    of its files (hashing their bytes would read a copy of many GB at every start). None for
    the hub and other non-paths."""
    path = Path(source) if source is not None else None
    if path is None or not path.exists():
        return None
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]


def subset(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """The row indices evaluated: all, or `limit` of them drawn with `seed`, in row order.
    The same arguments always give the same rows, so every cell sees the same samples."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), limit))


@dataclass(frozen=True)
class StoredImage:
    """An image as a row stores it, decoded when called (inside its sample's failure guard);
    `path`: the file it is in, None where the row holds its bytes."""

    raw: object
    root: Path | None

    @property
    def path(self) -> Path | None:
        return image_path(self.raw, self.root)

    def __call__(self) -> Image.Image:
        return open_image(self.raw, self.root)


def open_image(raw, root: Path | None) -> Image.Image:
    """Decode an image as datasets, parquet or JSONL store it: a PIL image, {bytes, path},
    raw bytes, or a path (relative to `root`); decoded now, so that a truncated file fails
    here (`tokendrop.files`: only regular files, no decompression bombs)."""
    if isinstance(raw, Image.Image):
        return raw.convert("RGB")
    if isinstance(raw, dict) and raw.get("bytes") is not None:
        return files.decode_image(raw["bytes"], raw.get("path") or "from bytes")
    if isinstance(raw, bytes):
        return files.decode_image(raw, "from bytes")
    path = image_path(raw, root)
    if path is None:
        raise UsageError(f"cannot read an image from {type(raw).__name__}: expected a path, bytes or {{bytes, path}}")
    return files.open_image(path)


def image_path(raw, root: Path | None) -> Path | None:
    """The file an image stored as a path ({path} without bytes, or a string) is in, relative
    to `root`; None for an image stored otherwise."""
    if isinstance(raw, dict) and raw.get("bytes") is None and raw.get("path"):
        raw = raw["path"]
    if not isinstance(raw, str):
        return None
    path = Path(raw).expanduser()
    return path if path.is_absolute() or root is None else root / path

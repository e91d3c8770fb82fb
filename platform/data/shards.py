"""The prepared-data contract: Parquet shards and their manifest, shared by writer and readers.

`dynroute data prepare` writes, under its output folder:

    manifest.json                  counts, content hash, per-shard checksums, class names
    class_stats.json               class pixel counts and frequencies per split (a DVC metric)
    shards/{split}-{i:05d}-of-{n:05d}.parquet

One row per image, in a deterministic order (sorted ids). Columns (`SCHEMA`):

    id            string   the dataset's own image id (e.g. frankfurt_000000_000294, 2008_000002)
    image         binary   the raw dataset's encoded image bytes, untouched (PNG or JPEG, RGB)
    image_format  string   "png" or "jpeg"
    label         binary   PNG, 8-bit single channel: train ids 0..K-1, 255 = ignore
    height        int32
    width         int32
    histogram     list<int64>, K+1 entries: pixels of each train id, then ignored pixels

Row groups hold a few images so a reader streams with bounded memory. Shards are read from a
local path or an `s3://` URI through pyarrow filesystems (`filesystem_for`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

FORMAT_VERSION = 1
IGNORE_INDEX = 255
MANIFEST = "manifest.json"
CLASS_STATS = "class_stats.json"
# The scene kind of each image ("<split>/<id>" → kind), where the raw data said (the synthetic
# sets do: small / large / mixed objects); evaluation groups its per-image figures by it.
SCENE_KINDS = "scene_kinds.json"
SHARD_DIR = "shards"

_COMPRESSION = {"id": "zstd", "image": "none", "image_format": "zstd", "label": "none",
                "height": "zstd", "width": "zstd", "histogram": "zstd"}

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("image_format", pa.string(), nullable=False),
    pa.field("label", pa.binary(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("histogram", pa.list_(pa.int64()), nullable=False),
])


class ManifestError(ValueError):
    """A manifest or shard that is missing, malformed or does not match its checksum."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{SHARD_DIR}/{split}-{index:05d}-of-{count:05d}.parquet"


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root, POSIX separators
    rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` holds."""

    dataset: str
    num_classes: int
    class_names: tuple[str, ...]
    splits: dict[str, tuple[ShardInfo, ...]]
    content_hash: str

    def count(self, split: str) -> int:
        return sum(s.rows for s in self.shards(split))

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        if split not in self.splits:
            raise ManifestError(f"split {split!r} is not in the manifest; it has "
                                f"{sorted(self.splits)}")
        return self.splits[split]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "ignore_index": IGNORE_INDEX,
            "content_hash": self.content_hash,
            "splits": {
                split: {"count": sum(s.rows for s in shards),
                        "shards": [{"path": s.path, "rows": s.rows, "sha256": s.sha256}
                                   for s in shards]}
                for split, shards in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = MANIFEST) -> Manifest:
        try:
            if data.get("format") != FORMAT_VERSION:
                raise ManifestError(f"{source}: format {data.get('format')!r} is not "
                                    f"{FORMAT_VERSION}; prepare the data again")
            splits = {
                split: tuple(ShardInfo(s["path"], int(s["rows"]), s["sha256"])
                             for s in entry["shards"])
                for split, entry in data["splits"].items()
            }
            return cls(dataset=data["dataset"], num_classes=int(data["num_classes"]),
                       class_names=tuple(data["class_names"]), splits=splits,
                       content_hash=data["content_hash"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"{source} is malformed ({err!r}); prepare the data again") \
                from None


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or an `s3://` URI.

    S3-compatible endpoints come from AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), credentials and
    region from the usual AWS environment variables.
    """
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            options |= {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        return pafs.S3FileSystem(**options), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(root: str, relative: str) -> str:
    return str(PurePosixPath(root) / relative)


def read_manifest(root: str) -> Manifest:
    """Read `manifest.json` of a prepared dataset at a local path or `s3://` URI."""
    fs, base = filesystem_for(root)
    path = join(base, MANIFEST)
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST} under {root}; run `dynroute data prepare` first") \
            from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{root}/{MANIFEST} is not valid JSON: {err}") from None
    return Manifest.from_dict(data, source=f"{root}/{MANIFEST}")


def write_scene_kinds(root: str | os.PathLike, kinds: Mapping[str, str]) -> None:
    """Write SCENE_KINDS ("<split>/<id>" → kind) into a local dataset folder being written."""
    with open(os.path.join(root, SCENE_KINDS), "w") as f:
        json.dump({"kinds": dict(sorted(kinds.items()))}, f, indent=1)
        f.write("\n")


def read_scene_kinds(root: str, split: str) -> dict[str, str] | None:
    """The scene kind of each image id of `split`, or None when the dataset records none."""
    fs, base = filesystem_for(root)
    path = join(base, SCENE_KINDS)
    try:
        with fs.open_input_stream(path) as f:
            kinds = json.loads(f.read())["kinds"]
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ManifestError(f"{root}/{SCENE_KINDS} is damaged ({err}); run `dynroute data "
                            f"prepare` again") from None
    prefix = f"{split}/"
    found = {key[len(prefix):]: str(kind) for key, kind in kinds.items()
             if key.startswith(prefix)}
    return found or None


def sha256_file(fs: pafs.FileSystem, path: str, *, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(root: str, manifest: Manifest | None = None,
                  splits: tuple[str, ...] | None = None) -> None:
    """Check the shards' checksums against the manifest (all splits, or `splits`); raise
    ManifestError naming a bad one."""
    manifest = manifest or read_manifest(root)
    fs, base = filesystem_for(root)
    for split in splits or tuple(manifest.splits):
        for shard in manifest.shards(split):
            path = join(base, shard.path)
            try:
                actual = sha256_file(fs, path)
            except FileNotFoundError:
                raise ManifestError(f"shard {shard.path} listed in the manifest is missing "
                                    f"under {root}; prepare or pull the data again") from None
            if actual != shard.sha256:
                raise ManifestError(f"shard {shard.path} under {root} does not match its "
                                    f"checksum; prepare or pull the data again")


class ShardWriter:
    """Writes one dataset's splits as shards plus the manifest, into a local folder.

    Rows are dicts with the SCHEMA's columns, given in their final order. The content hash covers
    (split, id, sha256(image), sha256(label)) of every row in order, so it depends on the data,
    not on how pyarrow lays out the files.

    Args:
        root: the (temporary) output folder; `shards/` is created inside.
        rows_per_shard: images per Parquet file.
        rows_per_group: images per row group (what a reader holds in memory at once). A shuffled
            reader fetches a whole group for one row, so keep it small for large images.
    """

    def __init__(self, root: str, *, dataset: str, class_names: tuple[str, ...],
                 rows_per_shard: int = 500, rows_per_group: int = 2) -> None:
        import pyarrow.parquet as pq  # noqa: F401 (fail early if the parquet module is missing)

        if rows_per_shard < 1 or rows_per_group < 1:
            raise ValueError("rows_per_shard and rows_per_group must be at least 1")
        self.root = root
        self.dataset = dataset
        self.class_names = class_names
        self.rows_per_shard = rows_per_shard
        self.rows_per_group = rows_per_group
        self.splits: dict[str, tuple[ShardInfo, ...]] = {}
        self._content = hashlib.sha256()
        os.makedirs(os.path.join(root, SHARD_DIR), exist_ok=True)

    def write_split(self, split: str, rows, total: int) -> tuple[ShardInfo, ...]:
        """Write `total` rows of `split` (an iterable of row dicts, consumed lazily)."""
        import pyarrow.parquet as pq

        count = max(1, -(-total // self.rows_per_shard))
        infos: list[ShardInfo] = []
        iterator = iter(rows)
        for index in range(count):
            name = shard_name(split, index, count)
            path = os.path.join(self.root, name)
            n = min(self.rows_per_shard, total - index * self.rows_per_shard)
            written = 0
            # Images and labels are PNG/JPEG already: compressing or dictionary-encoding them
            # again costs CPU for nothing.
            with pq.ParquetWriter(path, SCHEMA, compression=_COMPRESSION,
                                  use_dictionary=["id", "image_format"],
                                  write_statistics=False) as writer:
                while written < n:
                    group = [next(iterator) for _ in range(min(self.rows_per_group, n - written))]
                    for row in group:
                        self._content.update(
                            f"{split}\0{row['id']}\0{hashlib.sha256(row['image']).hexdigest()}"
                            f"\0{hashlib.sha256(row['label']).hexdigest()}\n".encode())
                    writer.write_table(pa.Table.from_pylist(group, schema=SCHEMA),
                                       row_group_size=self.rows_per_group)
                    written += len(group)
            infos.append(ShardInfo(name, n, sha256_file(pafs.LocalFileSystem(), path)))
        self.splits[split] = tuple(infos)
        return self.splits[split]

    def finish(self, class_stats: dict) -> Manifest:
        """Write manifest.json and class_stats.json; returns the manifest."""
        manifest = Manifest(dataset=self.dataset, num_classes=len(self.class_names),
                            class_names=self.class_names, splits=dict(self.splits),
                            content_hash=self._content.hexdigest())
        for name, data in ((MANIFEST, manifest.to_dict()), (CLASS_STATS, class_stats)):
            with open(os.path.join(self.root, name), "w") as f:
                json.dump(data, f, indent=2, sort_keys=False)
                f.write("\n")
        return manifest

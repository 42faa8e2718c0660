"""The converted-dataset format: one place for the manifest schema and the .beton field layout.

A converted dataset is a directory:

    manifest.parquet    one row per sample (sorted by id), schema metadata: classes, options, shards
    skipped.parquet     the source images that could not be decoded (possibly empty)
    shard-00000.beton   FFCV files with the fields image (RGBImageField), label and id (IntField)

The sample id is the index of the image in `torchvision.datasets.ImageFolder(src).samples`, so the
ffcv loader and the ImageFolder fallback name every sample the same way. The converter writes this
module's tables, the loader reads them; neither spells a column name itself.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "moco_ray.manifest/1"
MANIFEST = "manifest.parquet"
SKIPPED = "skipped.parquet"

# Fields of every .beton shard, in file order. A row whose id is -1 is a placeholder for a skipped
# image: it stays in the shard (the writer cannot drop rows) and never appears in the manifest.
IMAGE, LABEL, ID = "image", "label", "id"

# The evaluation's center crop over its resize (the ImageNet protocol's 224 of 256): the loaders crop
# evaluation images by it, and the embedded demo datasets draw their content inside it.
EVAL_CROP = 224 / 256

SCHEMA = pa.schema([
    pa.field("id", pa.int64()),            # index in ImageFolder(src).samples
    pa.field("shard", pa.int32()),         # shard number (file: shard_name(shard))
    pa.field("index", pa.int64()),         # row inside the shard
    pa.field("label", pa.int64()),
    pa.field("class_name", pa.string()),
    pa.field("path", pa.string()),         # source image, relative to the source root
    pa.field("bytes", pa.int64()),         # size of the source image file
])

SKIPPED_SCHEMA = pa.schema([
    pa.field("id", pa.int64()),
    pa.field("label", pa.int64()),
    pa.field("path", pa.string()),
    pa.field("reason", pa.string()),
])


def shard_name(i):
    return f"shard-{i:05d}.beton"


@dataclass
class Manifest:
    root: Path
    ids: np.ndarray        # (n,) int64, ascending
    shard: np.ndarray      # (n,) int32
    index: np.ndarray      # (n,) int64
    labels: np.ndarray     # (n,) int64
    classes: list
    options: dict
    shards: list           # per shard: {"file", "rows", "samples"}

    def __len__(self):
        return len(self.ids)

    def shard_path(self, i):
        return self.root / self.shards[i]["file"]


def _atomic_write(table, path):
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_manifest(out, columns, *, classes, options, shards):
    """Writes manifest.parquet atomically. `columns` maps each SCHEMA name to a sequence."""
    meta = {
        "moco_ray.format": FORMAT,
        "moco_ray.classes": json.dumps(list(classes)),
        "moco_ray.options": json.dumps(options, sort_keys=True),
        "moco_ray.shards": json.dumps(shards),
    }
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)
    table = table.sort_by("id").replace_schema_metadata(meta)
    _atomic_write(table, Path(out) / MANIFEST)


def write_skipped(out, rows):
    """rows: dicts with SKIPPED_SCHEMA keys."""
    table = pa.Table.from_pylist(list(rows), schema=SKIPPED_SCHEMA)
    _atomic_write(table, Path(out) / SKIPPED)


def read_metadata(root):
    """The manifest's schema metadata (classes, options, shards) and row count, without the rows."""
    path = Path(root) / MANIFEST
    schema = pq.read_schema(path)
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if meta.get("moco_ray.format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {meta.get('moco_ray.format')!r})")
    return {
        "n": pq.ParquetFile(path).metadata.num_rows,
        "classes": json.loads(meta["moco_ray.classes"]),
        "options": json.loads(meta["moco_ray.options"]),
        "shards": json.loads(meta["moco_ray.shards"]),
    }


def read_manifest(root):
    root = Path(root).resolve()
    meta = read_metadata(root)
    t = pq.read_table(root / MANIFEST, columns=["id", "shard", "index", "label"])
    col = lambda name: t.column(name).to_numpy()  # noqa: E731
    return Manifest(root=root, ids=col("id"), shard=col("shard"), index=col("index"),
                    labels=col("label"), classes=meta["classes"], options=meta["options"],
                    shards=meta["shards"])


def read_skipped(root):
    path = Path(root) / SKIPPED
    return pq.read_table(path) if path.exists() else pa.Table.from_pylist([], schema=SKIPPED_SCHEMA)

"""Data: manifests of every format (`manifest`, read by the `readers` registry into the table of
`validated`), the seeded split and class choice (`splits`; `subset`, the classes a
`class_fraction` keeps for train and eval), image decoding for models (`images`),
shards (`shards`, `streams`, `prepare`) and generated fixtures (`synthetic`, `bioscan`,
`treeoflife`)."""

from taxonclip.data.manifest import COLUMNS, Manifest, ManifestReport, load_manifest, read_manifest
from taxonclip.data.splits import Split, select_classes, split_manifest, stratum
from taxonclip.data.synthetic import default_dataset, generate

__all__ = ["COLUMNS", "Manifest", "ManifestReport", "Split", "default_dataset", "generate",
           "load_manifest", "read_manifest", "select_classes", "split_manifest", "stratum"]

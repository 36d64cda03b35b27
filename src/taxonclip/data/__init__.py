"""Data: manifests (`manifest`), the seeded split and class choice (`splits`), image decoding for
models (`images`) and the generated default specimens (`synthetic`)."""

from taxonclip.data.manifest import COLUMNS, Manifest, ManifestReport, load_manifest, read_manifest
from taxonclip.data.splits import Split, select_classes, split_manifest, stratum
from taxonclip.data.synthetic import default_dataset, generate

__all__ = ["COLUMNS", "Manifest", "ManifestReport", "Split", "default_dataset", "generate",
           "load_manifest", "read_manifest", "select_classes", "split_manifest", "stratum"]

"""TreeOfLife-10M (the data BioCLIP was trained on) as its owners write it: WebDataset shards of
224 x 224 JPEGs, each sample `<key>.jpg` beside its names and captions, and a small set of
shards in exactly that key layout (`taxonclip data synth --format treeoflife`).

Per sample: `scientific_name.txt`, `taxonomic_name.txt` (the known ranks kingdom to species,
space separated; the species as its epithet), `common_name.txt` (the scientific name where no
common one is known), and the captions `sci.txt` ("a photo of {scientific}."), `com.txt`,
`taxon.txt`, `taxonTag.txt` ("a photo of kingdom Animalia phylum ..."), `sci_com.txt`,
`taxon_com.txt`, `taxonTag_com.txt`. The reader is `taxonclip.data.readers.treeoflife`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from taxonclip.data.synthetic import _make_folder, render, taxonomy
from taxonclip.errors import DataError

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
IMAGE_KEY = "jpg"
TAXONOMIC_KEY = "taxonomic_name.txt"
SCIENTIFIC_KEY = "scientific_name.txt"
COMMON_KEY = "common_name.txt"
TAGGED_KEY = "taxonTag.txt"
# the caption keys, by the name text_key= takes
TEXT_KEYS = {name: f"{name}.txt" for name in
             ("sci", "com", "taxon", "taxonTag", "sci_com", "taxon_com", "taxonTag_com")}
NAME_KEYS = (SCIENTIFIC_KEY, TAXONOMIC_KEY, COMMON_KEY)
SAMPLE_KEYS = (IMAGE_KEY, *NAME_KEYS, *TEXT_KEYS.values())
PHOTO_PREFIX, PHOTO_END = "a photo of ", "."


def sample_texts(ranks: dict[str, str], common: str | None) -> dict[str, str]:
    """The name and caption files of one sample whose known ranks are `ranks` (the species as
    its epithet), as the owners' shards hold them."""
    known = [rank for rank in RANKS if ranks.get(rank)]
    taxonomic = " ".join(ranks[rank] for rank in known)
    scientific = (f"{ranks['genus']} {ranks['species']}" if ranks.get("genus") and
                  ranks.get("species") else ranks[known[-1]])
    common = common or scientific
    tagged = " ".join(f"{rank} {ranks[rank]}" for rank in known)
    with_common = f" with common name {common}"
    return {SCIENTIFIC_KEY: scientific, TAXONOMIC_KEY: taxonomic, COMMON_KEY: common,
            "sci.txt": f"{PHOTO_PREFIX}{scientific}.", "com.txt": f"{PHOTO_PREFIX}{common}.",
            "taxon.txt": f"{PHOTO_PREFIX}{taxonomic}.", TAGGED_KEY: f"{PHOTO_PREFIX}{tagged}.",
            "sci_com.txt": f"{PHOTO_PREFIX}{scientific}{with_common}.",
            "taxon_com.txt": f"{PHOTO_PREFIX}{taxonomic}{with_common}.",
            "taxonTag_com.txt": f"{PHOTO_PREFIX}{tagged}{with_common}."}


# The fixture: 2 phyla (one taxa of the generated specimens each) x 2 genera x 3 species, 6
# images a species spread over the train shards and 2 in the val shard; a few samples lack a
# rank (a family, or the species), as TreeOfLife-10M's do.
FIXTURE_PLANS = {"Fish": ("Chordata", "Actinopterygii", "Perciformes"),
                 "Butterfly": ("Arthropoda", "Insecta", "Lepidoptera")}
FIXTURE_GENERA, FIXTURE_SPECIES = 2, 3
TRAIN_IMAGES, VAL_IMAGES = 6, 2
TRAIN_SHARDS = 4
TRAIN_FOLDER, VAL_FOLDER = "train", "val"
_FIXTURE_IMAGE_STREAM = 11


def shard_file(index: int) -> str:
    """The owners' shard name: `shard-NNNNNN.tar`."""
    return f"shard-{index:06d}.tar"


def fixture_patterns(root: str | Path) -> tuple[str, str]:
    """The train and val shard patterns of a fixture written into `root`."""
    root = Path(root)
    train = root / TRAIN_FOLDER / f"shard-{{000000..{TRAIN_SHARDS - 1:06d}}}.tar"
    return str(train), str(root / VAL_FOLDER / shard_file(0))


def write_fixture(out: str | Path, seed: int = 0, size: int = 32) -> Path:
    """Write a small TreeOfLife-10M-format set of generated specimens into `out` (absent or
    empty): `train/shard-00000{0..3}.tar` and `val/shard-000000.tar`; returns `out`."""
    import webdataset

    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not an empty folder; choose a new or empty one")
    _make_folder(root)
    shards: dict[Path, list[dict]] = {}
    for number, (sp, ranks, common, where) in enumerate(_specimens(seed)):
        rng = np.random.default_rng([seed, _FIXTURE_IMAGE_STREAM, number])
        image = io.BytesIO()
        render(sp, rng, size).save(image, format="JPEG", quality=95)
        texts = {k: v.encode() for k, v in sample_texts(ranks, common).items()}
        shards.setdefault(root / where, []).append(
            {"__key__": f"{seed:02d}{number:06d}", IMAGE_KEY: image.getvalue(), **texts})
    for path, samples in sorted(shards.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as stream:
            writer = webdataset.TarWriter(stream, encoder=False, mtime=0)
            for sample in samples:
                writer.write(sample)
            writer.close()
    return root


def _specimens(seed: int) -> list[tuple]:
    """(species drawn, its ranks, its common name, shard path) of every fixture image."""
    out = []
    for plan_index, (plan, (phylum, cls, order)) in enumerate(FIXTURE_PLANS.items()):
        catalogue = taxonomy(seed, plan_index, len(FIXTURE_PLANS), FIXTURE_GENERA, FIXTURE_SPECIES)
        for index, sp in enumerate(catalogue):
            genus, epithet = sp.name.split(" ", 1)
            ranks = {"kingdom": "Animalia", "phylum": phylum, "class": cls, "order": order,
                     "family": f"{sp.genus.name}idae", "genus": genus, "species": epithet}
            common = f"{plan.lower()} {index}" if index % 2 == 0 else None
            for image in range(TRAIN_IMAGES + VAL_IMAGES):
                own = dict(ranks)
                if image == 1 and index % 3 == 0:
                    own.pop("family")  # a rank missing in the middle
                if image == 2 and index % 3 == 1:
                    own.pop("species")  # named to genus only
                where = (Path(VAL_FOLDER) / shard_file(0) if image >= TRAIN_IMAGES else
                         Path(TRAIN_FOLDER) / shard_file((image + index) % TRAIN_SHARDS))
                out.append((sp, own, common, where))
    return out

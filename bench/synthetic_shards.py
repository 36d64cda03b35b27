"""A prepared folder of generated specimens, for the from-shards rows of bench/train_throughput.py.

    python bench/synthetic_shards.py --out /tmp/shards                  # 6,400 images of 256 px
    python bench/synthetic_shards.py --out /tmp/shards --per-species 20 --size 64

Generates `taxonclip.data.synthetic` specimens (4 taxa x 4 genera x 5 species, --per-species
images each) in the VLM4Bio layout beside --out, prepares them into --out (`taxonclip data
prepare`, --workers processes) and deletes the generated files. Prints the images and bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TAXA, GENERA, SPECIES = 4, 4, 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the prepared folder to write (new)")
    parser.add_argument("--per-species", type=int, default=80, help="images of each of the 80 species")
    parser.add_argument("--size", type=int, default=256, help="px of the generated images")
    parser.add_argument("--workers", type=int, default=None, help="prepare's processes (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from taxonclip.data.manifest import read_manifest
    from taxonclip.data.prepare import prepare
    from taxonclip.data.synthetic import generate

    args = parse_args(argv)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix="specimens-", dir=args.out.parent))
    try:
        root = generate(staging / "set", seed=args.seed, taxa=TAXA, genera=GENERA, species=SPECIES,
                        images=args.per_species, size=args.size)
        generated = time.perf_counter()
        result = prepare(read_manifest(root), args.out, workers=args.workers, progress=False)
    finally:
        shutil.rmtree(staging)
    print(f"{TAXA * GENERA * SPECIES * args.per_species} images of {args.size} px: generated in "
          f"{generated - start:.0f} s, prepared in {time.perf_counter() - generated:.0f} s "
          f"({result.output_bytes / 1e6:.0f} MB of shards) into {args.out}")


if __name__ == "__main__":
    main()

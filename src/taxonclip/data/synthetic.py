"""Generated specimens: labelled images with a real taxonomy, made from numpy and PIL alone.

A taxon is a body plan (fish, bird, butterfly, ...) with its own range of body hues; a genus
shares a body colour, a marking colour and a pattern family (stripes, spots, rings, chevrons,
checks); a species fixes the pattern's details (how many marks, how wide, at what angle, where)
and the colour of a body part (a fish's tail, a bird's beak). Inside a species every image varies
in pose, size, rotation, position, background, lighting and noise, so species is harder to tell
apart than genus, and genus harder than taxa.

Everything is drawn from generators seeded by the seed and the item's place in the hierarchy, so
the same seed writes the same bytes. The set is written in the VLM4Bio layout:
`<root>/<Taxon>/metadata/metadata.csv` (`fileNameAsDelivered,scientificName,caption`, the caption
being a short field-guide description of the species) and `<root>/<Taxon>/images/*.png`.
"""

from __future__ import annotations

import colorsys
import csv
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from taxonclip.config import cache_dir
from taxonclip.errors import ConfigError, DataError

VERSION = "v1"  # part of the cache folder name: bump it whenever the images change
DEFAULT = MappingProxyType({"seed": 0, "taxa": 3, "genera": 4, "species": 5, "images": 30,
                            "size": 64})

BODY_PLANS = ("Fish", "Bird", "Butterfly", "Beetle", "Starfish", "Snail")
PATTERNS = ("stripes", "spots", "rings", "chevrons", "checks")
MARK_COUNTS = (2, 3, 4, 5, 6, 7, 8, 9)  # distinct per species of a genus, so it names them
SUPERSAMPLE = 2  # specimens are drawn at twice the size, then scaled down for smooth edges

_COUNT_PREFIX = {2: "bi", 3: "tri", 4: "quadri", 5: "quinque", 6: "sex", 7: "septem", 8: "octo",
                 9: "novem"}
_COUNT_WORD = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
               9: "nine"}
_PATTERN_STEM = {"stripes": "lineata", "spots": "maculata", "rings": "annulata",
                 "chevrons": "sagittata", "checks": "tessellata"}
_ACCENT_PART = {"Fish": "tail and dorsal fin", "Bird": "beak and tail", "Butterfly":
                "hindwing eyespots", "Beetle": "pronotum", "Starfish": "central disc",
                "Snail": "foot"}
_SYLLABLES = ("ba", "cor", "da", "el", "fa", "gor", "hel", "ka", "lam", "mor", "nel", "or", "pa",
              "quin", "ros", "sa", "ter", "ul", "ver", "xan", "zo", "thy", "phi", "cle")
_ENDINGS = ("a", "us", "is", "ia", "ops", "ella", "ura", "on")
_COLOUR_NAMES = {
    "black": (20, 20, 20), "charcoal": (60, 60, 65), "slate grey": (110, 120, 130),
    "white": (245, 245, 245), "cream": (240, 225, 180), "sand": (200, 180, 130),
    "brown": (120, 75, 40), "rust": (170, 80, 40), "crimson": (190, 20, 50), "red": (220, 40, 30),
    "orange": (240, 130, 30), "amber": (230, 170, 20), "yellow": (240, 220, 40),
    "olive": (120, 130, 40), "green": (50, 160, 60), "emerald": (20, 130, 90),
    "teal": (20, 130, 130), "turquoise": (60, 200, 200), "sky blue": (110, 170, 230),
    "blue": (40, 80, 200), "navy": (25, 35, 100), "violet": (130, 70, 190),
    "purple": (110, 30, 120), "magenta": (210, 40, 160), "pink": (240, 150, 180),
}
_DARK = (25, 22, 20)  # eyes, legs and antennae

_GENUS_STREAM, _SPECIES_STREAM, _IMAGE_STREAM, _NAME_STREAM, _TAXON_STREAM = range(1, 6)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Genus:
    """A body plan with one colour scheme and pattern family."""

    name: str
    taxon: str
    pattern: str
    body: RGB
    marking: RGB


@dataclass(frozen=True)
class Species:
    """The details of the genus pattern that tell this species apart."""

    genus: Genus
    epithet: str
    count: int
    width: float
    angle: float
    accent: RGB
    layout: tuple[tuple[float, float], ...]
    place: tuple[int, int, int]  # taxon, genus and species index: seeds this species' images

    @property
    def name(self) -> str:
        return f"{self.genus.name} {self.epithet}"


def generate(out: str | Path, seed: int = 0, taxa: int = 3, genera: int = 4, species: int = 5,
             images: int = 30, size: int = 64) -> Path:
    """Write `images` pictures of `size` px for each of taxa x genera x species species into
    `out` (absent or empty), and return `out`: the dataset root, in the VLM4Bio layout."""
    _check_counts(seed, taxa, genera, species, images, size)
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not an empty folder; choose a new or empty one")
    _make_folder(root)
    for taxon_index, taxon in enumerate(BODY_PLANS[:taxa]):
        catalogue = taxonomy(seed, taxon_index, taxa, genera, species)
        _write_taxon(root / taxon, catalogue, seed, images, size)
    return root


def _make_folder(root: Path) -> None:
    """Create `root` and its parents, or raise a DataError naming what is in the way."""
    in_the_way = next((p for p in root.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise DataError(f"cannot write {root}: {in_the_way} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot write {root}: {err.strerror or err}") from None


def default_dataset() -> Path:
    """The default set (3 taxa x 4 genera x 5 species x 30 images, 64 px, seed 0) in the cache
    folder, generated on first use into a temporary folder that is then renamed into place, so
    a reader never sees a half-written set and concurrent first uses are safe."""
    p = DEFAULT
    target = cache_dir() / (f"synthetic-{VERSION}-seed{p['seed']}-{p['taxa']}x{p['genera']}"
                            f"x{p['species']}x{p['images']}-{p['size']}px")
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=target.parent))
    except OSError as err:
        raise DataError(f"cannot write the default dataset into {target.parent}: {err}") from None
    try:
        generate(staging, **p)
        staging.rename(target)
    except OSError as err:
        if not target.is_dir():  # another process renaming its copy first is not a failure
            raise DataError(f"cannot write the default dataset into {target}: {err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def taxonomy(seed: int, taxon_index: int, n_taxa: int, genera: int, species: int) -> list[Species]:
    """Every species of one taxon, genus by genus, as `generate` draws them."""
    taxon = BODY_PLANS[taxon_index]
    taxon_rng = np.random.default_rng([seed, _TAXON_STREAM, taxon_index])
    hue = (taxon_index / n_taxa + taxon_rng.uniform(-0.03, 0.03)) % 1.0
    patterns = taxon_rng.permutation(PATTERNS)
    names = _genus_names(seed, taxon_index, genera)
    catalogue = []
    for g in range(genera):
        rng = np.random.default_rng([seed, _GENUS_STREAM, taxon_index, g])
        genus = _draw_genus(rng, names[g], taxon, str(patterns[g % len(PATTERNS)]), hue, g, genera)
        counts = np.random.default_rng([seed, _SPECIES_STREAM, taxon_index, g]).choice(
            MARK_COUNTS, size=species, replace=False)
        for s in range(species):
            rng = np.random.default_rng([seed, _SPECIES_STREAM, taxon_index, g, s])
            place = (taxon_index, g, s)
            catalogue.append(_draw_species(rng, genus, int(counts[s]), place, species))
    return catalogue


def caption(sp: Species) -> str:
    """A short field-guide description of a species: body plan, colours and pattern in words."""
    g = sp.genus
    return (f"{g.taxon}-like. Body {colour_name(g.body)}, marked with {_pattern_words(sp)} in "
            f"{colour_name(g.marking)}; {_ACCENT_PART[g.taxon]} {colour_name(sp.accent)}.")


def colour_name(rgb: RGB) -> str:
    """The nearest of a few everyday colour names."""
    return min(_COLOUR_NAMES,
               key=lambda name: sum((a - b) ** 2 for a, b in zip(_COLOUR_NAMES[name], rgb)))


def _check_counts(seed: int, taxa: int, genera: int, species: int, images: int, size: int) -> None:
    limits = {"seed": (seed, 0, None), "taxa": (taxa, 1, len(BODY_PLANS)),
              "genera": (genera, 1, None), "species": (species, 1, len(MARK_COUNTS)),
              "images": (images, 1, None), "size": (size, 16, None)}
    for name, (value, low, high) in limits.items():
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"parameter {name!r} must be {bound}, got {value}")


def _genus_names(seed: int, taxon_index: int, genera: int) -> list[str]:
    """Latin-looking genus names, unique across taxa: a taxon's names are drawn after those of
    the taxa before it from one stream."""
    rng = np.random.default_rng([seed, _NAME_STREAM])
    names: list[str] = []
    while len(names) < (taxon_index + 1) * genera:
        syllables = rng.choice(_SYLLABLES, size=rng.integers(2, 4))
        name = ("".join(syllables) + str(rng.choice(_ENDINGS))).capitalize()
        if name not in names:
            names.append(name)
    return names[taxon_index * genera:]


def _draw_genus(rng: np.random.Generator, name: str, taxon: str, pattern: str, taxon_hue: float,
                index: int, genera: int) -> Genus:
    # genera of a taxon spread over a band of hues around the taxon's own
    hue = taxon_hue + 0.14 * ((index + 0.5) / genera - 0.5) + rng.uniform(-0.01, 0.01)
    body = _hsv(hue, rng.uniform(0.45, 0.85), rng.uniform(0.55, 0.9))
    if rng.random() < 0.5:
        marking = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.3, 0.8), rng.uniform(0.1, 0.3))
    else:
        marking = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.2), rng.uniform(0.9, 1.0))
    return Genus(name=name, taxon=taxon, pattern=pattern, body=body, marking=marking)


def _draw_species(rng: np.random.Generator, genus: Genus, count: int, place: tuple[int, int, int],
                  species: int) -> Species:
    accent_hue = (place[2] / species + rng.uniform(-0.05, 0.05)) % 1.0
    layout = tuple((float(x), float(y)) for x, y in rng.uniform(0.22, 0.78, size=(count, 2)))
    return Species(genus=genus, epithet=_COUNT_PREFIX[count] + _PATTERN_STEM[genus.pattern],
                   count=count, width=float(rng.uniform(0.025, 0.07)),
                   angle=float(rng.uniform(0.0, 180.0)),
                   accent=_hsv(accent_hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)),
                   layout=layout, place=place)


def _write_taxon(folder: Path, catalogue: list[Species], seed: int, images: int, size: int) -> None:
    """The images and the metadata file of one taxon."""
    (folder / "images").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rows = []
    for sp in catalogue:
        for i in range(images):
            file_name = f"{folder.name.lower()}_{len(rows):05d}.png"
            rng = np.random.default_rng([seed, _IMAGE_STREAM, *sp.place, i])
            render(sp, rng, size).save(folder / "images" / file_name, format="PNG",
                                       compress_level=6)
            rows.append((file_name, sp.name, caption(sp)))
    with open(folder / "metadata" / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("fileNameAsDelivered", "scientificName", "caption"))
        writer.writerows(rows)


def render(sp: Species, rng: np.random.Generator, size: int) -> Image.Image:
    """One picture of a specimen of `sp` in a random pose on a random background."""
    specimen = _draw_specimen(sp, size * SUPERSAMPLE)
    specimen = _light(specimen, rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:
        specimen = specimen.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    specimen = specimen.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BILINEAR)
    scaled = max(8, round(size * rng.uniform(0.65, 0.95)))
    specimen = specimen.resize((scaled, scaled), Image.Resampling.LANCZOS)
    canvas = _background(rng, size)
    slack = (size - scaled) / 2
    x, y = (round(slack + rng.uniform(-0.8, 0.8) * slack) for _ in range(2))
    canvas.paste(specimen, (x, y), specimen)
    noise = rng.normal(0, rng.uniform(2, 8), (size, size, 3))
    pixels = np.asarray(canvas, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw_specimen(sp: Species, canvas: int) -> Image.Image:
    """The specimen on a transparent square, facing right: patterned body, accent parts in the
    species colour, dark details."""
    body, accent, dark = (Image.new("L", (canvas, canvas)) for _ in range(3))
    _BODY_PLAN_DRAWERS[sp.genus.taxon](*(ImageDraw.Draw(m) for m in (body, accent, dark)), canvas)
    pattern = Image.new("RGB", (canvas, canvas), sp.genus.body)
    _draw_pattern(ImageDraw.Draw(pattern), sp, canvas)
    specimen = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    specimen.paste(pattern, (0, 0), body)
    specimen.paste(sp.accent, (0, 0, canvas, canvas), accent)
    specimen.paste(_DARK, (0, 0, canvas, canvas), dark)
    return specimen


def _draw_pattern(draw: ImageDraw.ImageDraw, sp: Species, c: int) -> None:
    colour, n, width = sp.genus.marking, sp.count, max(1, round(sp.width * c))
    centre = (c / 2, c / 2)
    if sp.genus.pattern == "stripes":
        for k in range(n):
            offset = (k - (n - 1) / 2) * 0.7 * c / n
            ends = [(-c, offset), (c, offset)]
            draw.line(_turn(ends, sp.angle, centre), fill=colour, width=width)
    elif sp.genus.pattern == "spots":
        for x, y in sp.layout:
            r = 1.3 * sp.width * c
            draw.ellipse((x * c - r, y * c - r, x * c + r, y * c + r), fill=colour)
    elif sp.genus.pattern == "rings":
        shift = 0.08 * c
        cx = c / 2 + shift * math.cos(math.radians(sp.angle))
        cy = c / 2 + shift * math.sin(math.radians(sp.angle))
        for k in range(n):
            r = (k + 1) / n * 0.42 * c
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
    elif sp.genus.pattern == "chevrons":
        for k in range(n):
            x = (k - (n - 1) / 2) * 0.7 * c / n
            arms = [(x - 0.12 * c, -0.25 * c), (x, 0.0), (x - 0.12 * c, 0.25 * c)]
            draw.line(_turn(arms, sp.angle, centre), fill=colour, width=width, joint="curve")
    else:
        cell = 0.8 * c / n
        for i in range(n):
            for j in range(i % 2, n, 2):
                x, y = -0.4 * c + i * cell, -0.4 * c + j * cell
                square = [(x, y), (x + cell, y), (x + cell, y + cell), (x, y + cell)]
                draw.polygon(_turn(square, sp.angle, centre), fill=colour)


def _turn(points: list[tuple[float, float]], degrees: float,
          centre: tuple[float, float]) -> list[tuple[float, float]]:
    """Points given relative to `centre`, rotated by `degrees` and moved to it."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos) for x, y in points]


def _fish(body: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, dark: ImageDraw.ImageDraw,
          c: int) -> None:
    body.ellipse(_box(0.22, 0.33, 0.82, 0.67, c), fill=255)
    accent.polygon(_pts([(0.28, 0.5), (0.05, 0.28), (0.05, 0.72)], c), fill=255)
    accent.polygon(_pts([(0.40, 0.37), (0.52, 0.18), (0.64, 0.37)], c), fill=255)
    dark.ellipse(_box(0.70, 0.44, 0.75, 0.49, c), fill=255)


def _bird(body: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, dark: ImageDraw.ImageDraw,
          c: int) -> None:
    body.ellipse(_box(0.22, 0.40, 0.72, 0.74, c), fill=255)
    body.ellipse(_box(0.58, 0.20, 0.84, 0.46, c), fill=255)
    accent.polygon(_pts([(0.82, 0.29), (0.97, 0.35), (0.82, 0.40)], c), fill=255)
    accent.polygon(_pts([(0.28, 0.52), (0.03, 0.44), (0.06, 0.66)], c), fill=255)
    for x in (0.42, 0.54):
        dark.line(_pts([(x, 0.72), (x - 0.02, 0.92)], c), fill=255, width=max(1, c // 40))
    dark.ellipse(_box(0.72, 0.28, 0.76, 0.32, c), fill=255)


def _butterfly(body: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, dark: ImageDraw.ImageDraw,
               c: int) -> None:
    for mirror in (False, True):
        forewing = [(0.48, 0.44), (0.12, 0.10), (0.04, 0.40), (0.46, 0.56)]
        hindwing = [(0.48, 0.52), (0.14, 0.58), (0.22, 0.90), (0.47, 0.70)]
        body.polygon(_pts(_mirrored(forewing, mirror), c), fill=255)
        body.polygon(_pts(_mirrored(hindwing, mirror), c), fill=255)
        ((x, y),) = _mirrored([(0.28, 0.68)], mirror)
        accent.ellipse(_box(x - 0.065, y - 0.065, x + 0.065, y + 0.065, c), fill=255)
        antenna = _mirrored([(0.49, 0.32), (0.40, 0.12)], mirror)
        dark.line(_pts(antenna, c), fill=255, width=max(1, c // 60))
    dark.ellipse(_box(0.46, 0.30, 0.54, 0.78, c), fill=255)


def _beetle(body: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, dark: ImageDraw.ImageDraw,
            c: int) -> None:
    for y in (0.45, 0.58, 0.71):
        dark.line(_pts([(0.18, y + 0.05), (0.82, y - 0.05)], c), fill=255, width=max(1, c // 50))
        dark.line(_pts([(0.18, y - 0.05), (0.82, y + 0.05)], c), fill=255, width=max(1, c // 50))
    body.ellipse(_box(0.30, 0.36, 0.70, 0.92, c), fill=255)
    accent.ellipse(_box(0.35, 0.20, 0.65, 0.40, c), fill=255)
    dark.ellipse(_box(0.43, 0.09, 0.57, 0.23, c), fill=255)


def _starfish(body: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, dark: ImageDraw.ImageDraw,
              c: int) -> None:
    star = [(0.5 + r * math.sin(k * math.pi / 5), 0.52 - r * math.cos(k * math.pi / 5))
            for k, r in zip(range(10), [0.45, 0.17] * 5)]
    body.polygon(_pts(star, c), fill=255)
    accent.ellipse(_box(0.40, 0.42, 0.60, 0.62, c), fill=255)


def _snail(body: ImageDraw.ImageDraw, accent: ImageDraw.ImageDraw, dark: ImageDraw.ImageDraw,
           c: int) -> None:
    accent.polygon(_pts([(0.08, 0.78), (0.90, 0.78), (0.93, 0.68), (0.62, 0.62), (0.12, 0.68)], c),
                   fill=255)
    for tip in ((0.86, 0.42), (0.96, 0.48)):
        dark.line(_pts([(0.84, 0.66), tip], c), fill=255, width=max(1, c // 50))
    body.ellipse(_box(0.16, 0.18, 0.72, 0.74, c), fill=255)


_BODY_PLAN_DRAWERS = {"Fish": _fish, "Bird": _bird, "Butterfly": _butterfly, "Beetle": _beetle,
                      "Starfish": _starfish, "Snail": _snail}


def _mirrored(points: list[tuple[float, float]], mirror: bool) -> list[tuple[float, float]]:
    return [(1 - x, y) for x, y in points] if mirror else points


def _box(x0: float, y0: float, x1: float, y1: float, c: int) -> tuple[float, float, float, float]:
    return (x0 * c, y0 * c, x1 * c, y1 * c)


def _pts(points: list[tuple[float, float]], c: int) -> list[tuple[float, float]]:
    return [(x * c, y * c) for x, y in points]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A muted colour with a smooth random texture, different in every image."""
    base = np.array(_hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.85)), np.float32)
    texture = Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8), "L").resize(
        (size, size), Image.Resampling.BICUBIC)
    shade = (np.asarray(texture, np.float32)[..., None] - 127.5) * rng.uniform(0.1, 0.3)
    return Image.fromarray(np.clip(base + shade, 0, 255).astype(np.uint8), "RGB")


def _light(specimen: Image.Image, factor: float) -> Image.Image:
    """The specimen lit `factor` times brighter, its transparency unchanged."""
    pixels = np.asarray(specimen, np.float32).copy()
    pixels[..., :3] = np.clip(pixels[..., :3] * factor, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGBA")


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _pattern_words(sp: Species) -> str:
    count, thin = _COUNT_WORD[sp.count], sp.width < 0.045
    if sp.genus.pattern == "stripes":
        slant = min(sp.angle % 180, 180 - sp.angle % 180)
        way = "lengthwise" if slant < 25 else "crosswise" if slant > 65 else "oblique"
        return f"{count} {'narrow' if thin else 'broad'} {way} stripes"
    if sp.genus.pattern == "spots":
        return f"{count} {'small' if thin else 'large'} round spots"
    if sp.genus.pattern == "rings":
        return f"{count} {'thin' if thin else 'thick'} concentric rings"
    if sp.genus.pattern == "chevrons":
        return f"{count} {'narrow' if thin else 'broad'} chevrons"
    return f"a check pattern {count} squares across"

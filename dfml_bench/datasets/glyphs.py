"""``glyphs``: the embedded default dataset, characters of many writing systems rendered offline.

Every class is one Unicode character; its images are that character drawn in the DejaVu fonts that
ship inside matplotlib (so nothing is downloaded), varied by font style, a random affine transform,
stroke width and colours. Classes are split by writing system, like Omniglot's alphabets: the scripts
of meta-test are never seen in meta-train. Images are 32x32 RGB, CIFAR-FS's geometry.

How it is built (all deterministic):

1. Fonts: every ``DejaVu*.ttf`` in matplotlib's ``mpl-data/fonts/ttf``; the cmap of each (read with
   fontTools) says which characters it really contains, so no character is drawn as a tofu box.
2. Candidates: per script (:data:`SCRIPTS`), the letters (or, for Braille, the symbols) whose Unicode
   name starts with the script's prefix, that have no canonical/compatibility decomposition (so no
   precomposed accented letters or presentation forms), are in DejaVu Sans and in at least
   :data:`MIN_FONTS` font files.
3. Near-duplicates: each candidate gets a canonical mask (DejaVu Sans, cropped to its ink, scaled to
   fit a 28-pixel box keeping its aspect ratio, centred in 32x32: the same normalisation the
   instances get, so two characters that differ only by size or position collapse). Candidates are
   visited in :data:`SCRIPTS` order, then code point order, and one is dropped when its soft-Jaccard
   distance to an already kept character is at most :data:`DUPLICATE_THRESHOLD`. This runs over ALL
   scripts whatever subset is asked for, so the class set of a script never depends on the subset,
   no two kept classes anywhere are near-duplicates, and none can straddle two splits.
4. Instances: each (character, font) is rendered once as a grayscale mask at twice the output size;
   instances are made in batches with torch: stroke width (erosion/dilation by max-pooling), affine
   jitter (rotation, scale, aspect, shear, translation via ``affine_grid``/``grid_sample``), 2x2
   area down-sampling, then colouring by the style (:data:`STYLES`). The random stream of a class
   is a ``torch.Generator`` seeded from (seed, style, class name), so a class's images do not
   depend on which other classes are built.
5. Hashes: the recipe hash covers the sha256 of every font file, :data:`GENERATOR_VERSION`, the
   Unicode database version, all parameters and the seed; it keys the cache file. The dataset hash
   is the recipe hash plus the hash of the images, labels, class names and split, so a different
   FreeType build that draws different pixels also gives a different dataset hash.

Split by writing system, fixed (chosen once from the class counts for ~64/16/20% of the classes,
like CIFAR-FS), see :data:`SCRIPT_SPLITS`. Candidates -> kept classes after de-duplication (removed
ones mostly look-alikes of an earlier script's letters, case pairs, small capitals, Braille cells
that are the same pattern shifted):

    meta-train  811 (64.5%)  latin 424->317, cyrillic 266->135, canadian_syllabics 403->336,
                             lisu 46->13, coptic 14->10
    meta-val    198 (15.8%)  greek 84->40, georgian 119->107, old_italic 31->27, hebrew 30->24
    meta-test   248 (19.7%)  armenian 77->53, arabic 51->39, lao 37->35, braille 256->121
    total      1257 classes of 13 scripts; 580 near-duplicates and 1 blank (U+2800) removed

With 60 images per class: 75,420 images, a 222 MiB cache file; a cold build takes about 8 s of CPU
(``benchmarks/bench_glyphs.py``), a cached load about 2 s.
"""

from __future__ import annotations

import itertools
import logging
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import paths
from ..utils import atomic_torch_save, derive_seed, make_generator, sha256_file, sha256_json, sha256_tensor
from .base import SPLITS, DatasetError, ImageDataset

log = logging.getLogger(__name__)

GENERATOR_VERSION = "glyphs-1"
MIN_FONTS = 4  # a character must be in at least this many font files, or it is dropped
CANONICAL_FONT = "DejaVuSans.ttf"  # the font of the canonical masks used for de-duplication
CANONICAL_SIZE = 32  # canonical mask side (the resolution a learner sees)
CANONICAL_BOX = 28  # the ink is scaled to fit this box inside the canonical mask
# Two characters whose canonical masks have a soft-Jaccard distance at most this are one class.
# 0 = pixel-identical; at 0.2 case pairs that differ only by size (o/O, c/C) and look-alikes across
# scripts (Latin A / Greek Alpha / Cyrillic A, Cyrillic Pe / Hebrew Het is just above) collapse,
# while one-dot differences in glyphs of a few strokes (Arabic, Braille with <= 4 dots) survive.
DUPLICATE_THRESHOLD = 0.2
GLYPH_BOX = 0.8  # fraction of the image side the glyph's larger side fills before affine jitter
RENDER_SCALE = 2  # glyph masks and the affine warp are at this multiple of the output size
STYLES = ("default", "outline", "textured", "natural", "natural-outline")
LOOK_STYLES = ("natural", "natural-outline")  # styles in which every class has its own look (sample_class_look)
HOLLOW_STYLES = ("outline", "natural-outline")  # styles that draw the glyph as an outline on a gradient ground
STROKE_PROBS = torch.tensor([0.25, 0.35, 0.3, 0.1])  # erode / none / dilate 1 / dilate 2
NOISE_BANK = 1024  # "default" style: per-pixel noise fields drawn once per seed, picked per image


@dataclass(frozen=True)
class Script:
    """A writing system: the Unicode name prefixes of its characters and the categories kept."""

    name: str
    prefixes: tuple[str, ...]
    categories: str = "L"  # first letter(s) of the Unicode general category kept (L = letters)


# Order matters: it is the de-duplication priority (an earlier script keeps a shared shape).
SCRIPTS: tuple[Script, ...] = (
    Script("latin", ("LATIN",)),
    Script("greek", ("GREEK",)),
    Script("cyrillic", ("CYRILLIC",)),
    Script("armenian", ("ARMENIAN",)),
    Script("georgian", ("GEORGIAN",)),
    Script("hebrew", ("HEBREW",)),
    Script("arabic", ("ARABIC",)),
    Script("lao", ("LAO",)),
    Script("canadian_syllabics", ("CANADIAN SYLLABICS",)),
    Script("lisu", ("LISU",)),
    Script("old_italic", ("OLD ITALIC",)),
    Script("coptic", ("COPTIC",)),
    Script("braille", ("BRAILLE PATTERN",), categories="S"),
)
SCRIPT_NAMES = tuple(s.name for s in SCRIPTS)

# Fixed assignment of writing systems to meta-train / meta-val / meta-test: 811 / 198 / 248 classes
# (64.5% / 15.8% / 19.7%). Related scripts (Latin, Cyrillic, Coptic, Lisu's Latin-like letters) are
# together in meta-train; meta-test holds scripts of other shapes (Braille dots, Arabic, Lao,
# Armenian). The class set does not depend on the seed.
SCRIPT_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("latin", "cyrillic", "canadian_syllabics", "lisu", "coptic"),
    "val": ("greek", "georgian", "old_italic", "hebrew"),
    "test": ("armenian", "arabic", "lao", "braille"),
}

# How held-out classes are split between meta-val and meta-test (GlyphsDataset's ``heldout``).
HELDOUT_MODES = ("script", "shuffled")

# Two disjoint script groups, each with its own train/val/test scripts, for a multi-domain pool of
# two glyph domains (e.g. group "a" in style "default" and group "b" in style "outline"), under the
# split above: "a" 653 / 131 / 156 classes, "b" 158 / 67 / 92.
SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    "a": ("latin", "canadian_syllabics", "georgian", "hebrew", "braille", "lao"),
    "b": ("cyrillic", "lisu", "coptic", "greek", "old_italic", "armenian", "arabic"),
}


# ----------------------------------------------------------------------------------------------
# Fonts and the character catalogue
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FontFile:
    """A font file. Equality (and the memo of rendered masks) goes by the file on disk (path, size,
    mtime); the sha256 is what goes into the dataset hash."""

    name: str  # file name, e.g. "DejaVuSans-Bold.ttf"
    path: str
    size: int
    mtime_ns: int
    sha256: str = field(compare=False)
    cmap: frozenset[int] = field(compare=False, repr=False)


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder, where the DejaVu fonts live."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_sha256(path: str | Path) -> str:
    """sha256 of a font file (a function of its own so tests can pretend a font changed)."""
    return sha256_file(path)


@lru_cache(maxsize=64)
def _read_cmap(path: str, size: int, mtime_ns: int) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    font = TTFont(path, lazy=True)
    try:
        return frozenset(font.getBestCmap().keys())
    finally:
        font.close()


def discover_fonts(directory: str | Path | None = None) -> tuple[FontFile, ...]:
    """All DejaVu font files in ``directory`` (default: matplotlib's), sorted by name, with hashes."""
    directory = Path(directory) if directory is not None else font_dir()
    files = sorted(directory.glob("DejaVu*.ttf"))
    if not files:
        raise DatasetError(
            f"glyphs: no DejaVu*.ttf font files in {directory}; the dataset is rendered from the DejaVu fonts "
            "that ship with matplotlib (mpl-data/fonts/ttf). Reinstall matplotlib (pip install --force-reinstall matplotlib)."
        )
    out = []
    for f in files:
        st = f.stat()
        cmap = _read_cmap(str(f), st.st_size, st.st_mtime_ns)
        out.append(FontFile(f.name, str(f), st.st_size, st.st_mtime_ns, font_sha256(f), cmap))
    return tuple(out)


def _pil_font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def render_fit(font, char: str, out_size: int, box: int) -> np.ndarray | None:
    """``char`` drawn with PIL ``font``, cropped to its ink, scaled to fit ``box`` keeping its aspect
    ratio, centred in an ``out_size`` square: uint8 [out_size, out_size], or None if it has no ink."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(char)
    pad = 4
    canvas = Image.new("L", (max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, fill=255)
    ink = canvas.getbbox()
    if ink is None:
        return None
    crop = canvas.crop(ink)
    w, h = crop.size
    s = box / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    resample = Image.Resampling.BOX if s <= 1 else Image.Resampling.BILINEAR
    crop = crop.resize((nw, nh), resample)
    out = Image.new("L", (out_size, out_size), 0)
    out.paste(crop, ((out_size - nw) // 2, (out_size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def script_candidates(script: Script, fonts: Sequence[FontFile]) -> list[int]:
    """Code points of ``script`` that DejaVu Sans and at least MIN_FONTS font files contain."""
    canonical = next((f for f in fonts if f.name == CANONICAL_FONT), None)
    if canonical is None:
        raise DatasetError(f"glyphs: {CANONICAL_FONT} is missing from the font folder; reinstall matplotlib")
    out = []
    for cp in sorted(canonical.cmap):
        ch = chr(cp)
        if not unicodedata.category(ch).startswith(script.categories) or unicodedata.decomposition(ch):
            continue
        name = unicodedata.name(ch, "")
        if not any(name.startswith(p + " ") for p in script.prefixes):
            continue
        if sum(cp in f.cmap for f in fonts) >= MIN_FONTS:
            out.append(cp)
    return out


def mask_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft-Jaccard distance between flattened masks ``a`` [n, D] and ``b`` [m, D] (any scale).

    ``2|a-b|^2 / (|a|^2 + |b|^2 + |a-b|^2)``: for binary masks this is exactly 1 - IoU; computed in
    float64 from integer masks so it is exact and the same on every machine."""
    a, b = a.double(), b.double()
    na, nb = (a * a).sum(1), (b * b).sum(1)
    sq = (na[:, None] + nb[None, :] - 2 * a @ b.T).clamp_min_(0)
    den = na[:, None] + nb[None, :] + sq
    return torch.where(den > 0, 2 * sq / den.clamp_min(1e-12), torch.zeros_like(den))


@dataclass(frozen=True)
class GlyphClass:
    script: str
    codepoint: int
    fonts: tuple[int, ...]  # indices into the catalogue's fonts that contain the character

    @property
    def name(self) -> str:
        return f"{self.script}:U+{self.codepoint:04X}"

    @property
    def char(self) -> str:
        return chr(self.codepoint)


@dataclass(frozen=True, eq=False)
class Catalogue:
    """The kept classes of all scripts, after near-duplicate removal."""

    fonts: tuple[FontFile, ...]
    classes: tuple[GlyphClass, ...]
    canonical: torch.Tensor  # uint8 [n_classes, CANONICAL_SIZE, CANONICAL_SIZE]
    removed: dict[str, str]  # removed class name -> name of the kept class it duplicates (or "empty")
    n_candidates: dict[str, int]  # script -> candidates before de-duplication


@lru_cache(maxsize=2)
def _catalogue_cached(fonts: tuple[FontFile, ...], threshold: float) -> Catalogue:
    canonical_font = _pil_font(next(f.path for f in fonts if f.name == CANONICAL_FONT), 4 * CANONICAL_SIZE)
    names: list[tuple[str, int]] = []
    masks: list[np.ndarray] = []
    removed: dict[str, str] = {}
    n_candidates: dict[str, int] = {}
    for script in SCRIPTS:
        cps = script_candidates(script, fonts)
        n_candidates[script.name] = len(cps)
        for cp in cps:
            m = render_fit(canonical_font, chr(cp), CANONICAL_SIZE, CANONICAL_BOX)
            if m is None:
                removed[f"{script.name}:U+{cp:04X}"] = "empty"
                continue
            names.append((script.name, cp))
            masks.append(m)
    flat = torch.from_numpy(np.stack(masks)).reshape(len(masks), -1).to(torch.int64)
    dist = mask_distances(flat, flat)
    kept: list[int] = []
    for i in range(len(names)):
        if kept:
            d = dist[i, kept]
            j = int(torch.argmin(d))
            if float(d[j]) <= threshold:
                removed[f"{names[i][0]}:U+{names[i][1]:04X}"] = f"{names[kept[j]][0]}:U+{names[kept[j]][1]:04X}"
                continue
        kept.append(i)
    classes = tuple(
        GlyphClass(names[i][0], names[i][1], tuple(k for k, f in enumerate(fonts) if names[i][1] in f.cmap)) for i in kept
    )
    canonical = torch.from_numpy(np.stack([masks[i] for i in kept]))
    return Catalogue(fonts, classes, canonical, removed, n_candidates)


def build_catalogue(fonts: Sequence[FontFile] | None = None, threshold: float = DUPLICATE_THRESHOLD) -> Catalogue:
    """Candidates of every script, canonical masks and greedy near-duplicate removal (memoised)."""
    return _catalogue_cached(tuple(fonts) if fonts is not None else discover_fonts(), float(threshold))


@lru_cache(maxsize=1)
def _class_variants(fonts: tuple[FontFile, ...], res: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`stroke_variants` of :func:`_class_masks` (memoised), with the offsets and counts."""
    masks, offsets, counts = _class_masks(fonts, res)
    return stroke_variants(masks), offsets, counts


def _class_masks(fonts: tuple[FontFile, ...], res: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (class, font) mask of the catalogue at ``res``: (uint8 masks [M, res, res], offsets [C],
    counts [C]); the masks of class c are rows offsets[c] .. offsets[c] + counts[c]."""
    catalogue = build_catalogue(fonts)
    box = round(GLYPH_BOX * res)
    pil = {k: _pil_font(f.path, 2 * res) for k, f in enumerate(catalogue.fonts)}
    rows: list[np.ndarray] = []
    offsets, counts = [], []
    for cls in catalogue.classes:
        offsets.append(len(rows))
        n = 0
        for k in cls.fonts:
            m = render_fit(pil[k], cls.char, res, box)
            if m is not None:
                rows.append(m)
                n += 1
        if n == 0:
            raise DatasetError(f"glyphs: {cls.name} renders empty in every font; report this as a bug")
        counts.append(n)
    return torch.from_numpy(np.stack(rows)), torch.tensor(offsets), torch.tensor(counts)


# ----------------------------------------------------------------------------------------------
# Instances: random parameters per class, vectorised rendering per batch
# ----------------------------------------------------------------------------------------------


def _u(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


LOOK_WEIGHT = 0.6  # "natural" style: weight of the class's colours against per-image random ones (see below)


def sample_class_look(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A class's own appearance for the ``natural`` style, drawn once per class: two colour pairs (ink
    and ground, and the second colour of each texture) and the frequency and orientation of the ink's
    and the ground's stripes.

    In natural image classes colour and texture statistics are part of what a class is (sky behind
    aeroplanes, stripes on tigers); in the other styles they are per-image nuisances. With a class look a
    teacher's BatchNorm statistics and features carry colour and texture evidence that a data-free
    inversion can recover (``docs/proxy-validation.md``)."""
    return {
        "fg": torch.rand(3, generator=g), "bg": torch.rand(3, generator=g),
        "fg2": torch.rand(3, generator=g), "bg2": torch.rand(3, generator=g),
        "fg_freq": _u(g, (), 2.0, 8.0), "bg_freq": _u(g, (), 1.0, 5.0),
        "fg_angle": _u(g, (), 0.0, torch.pi), "bg_angle": _u(g, (), 0.0, torch.pi),
        # drawn last, so the looks of the "natural" style (which does not use it) are unchanged
        "grad_angle": _u(g, (), 0.0, 2 * torch.pi),
    }


def _natural_params(g: torch.Generator, n: int, look: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-instance colours and stripes of the ``natural`` style.

    Each image draws dark and light colours and a polarity (dark ink on light ground or the reverse) as
    in the default style, and pulls its colours toward the class's by :data:`LOOK_WEIGHT` (the value the
    dataset recipe records); stripe frequencies
    (+-20 %) and orientations (+-15 degrees) jitter around the class's. When a class fixed its colours
    and polarity (+-0.12 jitter) colour alone identified it: a 1-NN on images' colour means and
    deviations scored 89 % on meta-val 5-way 1-shot, the random Conv4 initialisation 68 %, and MAML on
    an untrained generator's images gained 15 points (a placebo that learns colour, not a proxy of
    CIFAR-FS). At weight 0.6 with per-image polarity colour is a weak cue, as in natural images (the same
    1-NN: 32 %, 23 % on ``glyphs-fs``), and the glyph's shape stays the main one."""
    swap = torch.rand(n, generator=g) < 0.5
    weight = LOOK_WEIGHT

    def pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dark = weight * torch.minimum(a, b) * 0.45 + (1 - weight) * _u(g, (n, 3), 0.0, 0.45)
        light = weight * (0.55 + 0.45 * torch.maximum(a, b)) + (1 - weight) * _u(g, (n, 3), 0.55, 1.0)
        return torch.where(swap[:, None], dark, light), torch.where(swap[:, None], light, dark)

    fg, bg = pair(look["fg"], look["bg"])
    fg2, bg2 = pair(look["fg2"], look["bg2"])
    return {
        "fg": fg, "bg": bg, "fg2": fg2, "bg2": bg2,
        "fg_freq": look["fg_freq"] * torch.exp(_u(g, n, -0.2, 0.2)),
        "bg_freq": look["bg_freq"] * torch.exp(_u(g, n, -0.2, 0.2)),
        "fg_angle": look["fg_angle"] + _u(g, n, -0.26, 0.26),
        "bg_angle": look["bg_angle"] + _u(g, n, -0.26, 0.26),
        "phase": _u(g, (n, 2), 0.0, 2 * torch.pi),
    }


def sample_instance_params(g: torch.Generator, n: int, n_fonts: int, style: str,
                           look: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Random parameters of ``n`` instances of one class, all drawn from ``g`` (``look``: the class's
    appearance, required by the ``natural`` style, see :func:`sample_class_look`)."""
    p = {
        "font": torch.randint(0, n_fonts, (n,), generator=g),
        # -1 erode, 0 none, 1 / 2 dilate by one / two units; a wide dilation is rarer (it fills loops)
        "stroke": torch.multinomial(STROKE_PROBS, n, replacement=True, generator=g) - 1,
        "angle": _u(g, n, -12.0, 12.0) * (torch.pi / 180),
        "scale": _u(g, n, 0.85, 1.1),
        "aspect": torch.exp(_u(g, n, -0.12, 0.12)),
        "shear": _u(g, n, -0.15, 0.15),
        "shift": _u(g, (n, 2), -0.08, 0.08),
    }
    swap = torch.rand(n, generator=g) < 0.5  # dark glyph on light ground, or the reverse
    dark = _u(g, (n, 3), 0.0, 0.4)
    light = _u(g, (n, 3), 0.6, 1.0)
    p["fg"] = torch.where(swap[:, None], dark, light)
    p["bg"] = torch.where(swap[:, None], light, dark)
    if style == "default":
        p["noise"] = _u(g, n, 0.0, 0.04)
        p["noise_field"] = torch.randint(0, NOISE_BANK, (n,), generator=g)
    elif style == "outline":
        p["bg2"] = torch.where(swap[:, None], _u(g, (n, 3), 0.6, 1.0), _u(g, (n, 3), 0.0, 0.4))
        p["grad_angle"] = _u(g, n, 0.0, 2 * torch.pi)
        p["width"] = torch.randint(1, 3, (n,), generator=g)  # outline width in render pixels (x2 kernel)
    elif style == "textured":
        p["fg2"] = torch.where(swap[:, None], _u(g, (n, 3), 0.0, 0.4), _u(g, (n, 3), 0.6, 1.0))
        p["bg2"] = torch.where(swap[:, None], _u(g, (n, 3), 0.6, 1.0), _u(g, (n, 3), 0.0, 0.4))
        p["fg_freq"] = _u(g, n, 3.0, 7.0)
        p["bg_freq"] = _u(g, n, 2.0, 5.0)
        p["fg_angle"] = _u(g, n, 0.0, torch.pi)
        p["bg_angle"] = _u(g, n, 0.0, torch.pi)
        p["phase"] = _u(g, (n, 2), 0.0, 2 * torch.pi)
    elif style in LOOK_STYLES:
        if look is None:
            raise DatasetError(f"glyphs: the {style!r} style needs the class look (sample_class_look)")
        p.update(_natural_params(g, n, look))
        if style == "natural-outline":  # hollow glyph on the class's gradient ground (a second natural domain)
            p["grad_angle"] = look["grad_angle"] + _u(g, n, -0.26, 0.26)
            p["width"] = torch.randint(1, 3, (n,), generator=g)
    else:  # pragma: no cover - validated by the dataset's constructor
        raise DatasetError(f"glyphs: unknown style {style!r}; choose one of {STYLES}")
    return p


def _max_filter(m: torch.Tensor, r: int, dim: int, fill: int = 0) -> torch.Tensor:
    """Running maximum over a window of 2r+1 along ``dim`` (-1 or -2), ``fill`` outside.

    Shifted ``torch.maximum`` instead of ``max_pool2d``: it works on uint8 and is several times
    faster on CPU for single-channel maps."""
    n = m.shape[dim]
    shape = list(m.shape)
    shape[dim] = r
    edge = torch.full(shape, fill, dtype=m.dtype)
    p = torch.cat([edge, m, edge], dim)
    out = p.narrow(dim, 0, n).clone()
    for i in range(1, 2 * r + 1):
        torch.maximum(out, p.narrow(dim, i, n), out=out)
    return out


def _dilate(m: torch.Tensor, r: int, fill: int = 0) -> torch.Tensor:
    """Grey dilation of masks [..., H, W] by a (2r+1) square (``fill`` outside)."""
    if r <= 0:
        return m
    return _max_filter(_max_filter(m, r, -1, fill), r, -2, fill)


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    """Grey erosion of uint8 masks [..., H, W] by a (2r+1) square (0 outside)."""
    return 255 - _dilate(255 - m, r, fill=255) if r > 0 else m


def _theta(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-instance ``affine_grid`` matrices [B, 2, 3]: rotate, scale, stretch, shear and shift."""
    b = p["angle"].shape[0]
    c, s = torch.cos(p["angle"]), torch.sin(p["angle"])
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    shear = torch.eye(2).repeat(b, 1, 1)
    shear[:, 0, 1] = p["shear"]
    diag = torch.diag_embed(torch.stack([p["scale"] * p["aspect"], p["scale"] / p["aspect"]], -1))
    fwd = rot @ shear @ diag  # glyph coordinates -> image coordinates
    inv = torch.linalg.inv(fwd)  # affine_grid maps output coordinates to input coordinates
    return torch.cat([inv, -(inv @ p["shift"][:, :, None])], 2)


def _coords(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1] (``align_corners=False``): x [1, 1, 1, S], y [1, 1, S, 1]."""
    lin = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    return lin.view(1, 1, 1, size), lin.view(1, 1, size, 1)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, 1, size, size], align_corners=False)`` by broadcasting, which is
    several times faster on CPU than the batched 3x2 matmul it does."""
    x, y = _coords(size)
    x, y = x[0], y[0]  # [1, 1, S], [1, S, 1]
    grid = torch.empty((theta.shape[0], size, size, 2))
    for k in range(2):
        t = theta[:, k, :, None, None]  # [B, 3, 1, 1]
        torch.add(t[:, 0] * x, t[:, 1] * y + t[:, 2], out=grid[..., k])
    return grid


def _colour(alpha: torch.Tensor, p: dict[str, torch.Tensor], style: str, noise_bank: torch.Tensor | None) -> torch.Tensor:
    """RGB images in [0, 1] (float [B, 3, S, S]) from glyph coverage ``alpha`` in [0, 255]
    ([B, 1, S, S]) and the style; in-place where possible (it is memory bound)."""
    size = alpha.shape[-1]
    fg = p["fg"][:, :, None, None]
    bg = p["bg"][:, :, None, None]
    if style == "default":
        img = alpha * ((fg - bg) / 255.0)
        img += bg
        img.addcmul_(noise_bank[p["noise_field"]], p["noise"][:, None, None, None])
        return img
    x, y = _coords(size)

    def ramp(angle: torch.Tensor) -> torch.Tensor:  # x cos a + y sin a, [B, 1, S, S]
        a = angle[:, None, None, None]
        return x * torch.cos(a) + y * torch.sin(a)

    if style in HOLLOW_STYLES:
        t = ramp(p["grad_angle"]).mul_(0.5).add_(0.5).clamp_(0, 1)
        ground = t * (p["bg2"][:, :, None, None] - bg)
        ground += bg
        fill = fg
        if style == "natural-outline":  # the class's ground texture, fainter than the gradient
            r = ramp(p["bg_angle"]).mul_(torch.pi * p["bg_freq"][:, None, None, None]).add_(p["phase"][:, 1, None, None, None])
            ground += r.sin_().mul_(0.5).add_(0.5) * (0.3 * (p["fg2"][:, :, None, None] - bg))
    else:  # textured / natural: sinusoidal stripes in the glyph and, fainter, in the ground

        def stripes(freq: torch.Tensor, angle: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
            r = ramp(angle).mul_(torch.pi * freq[:, None, None, None]).add_(phase[:, None, None, None])
            return r.sin_().mul_(0.5).add_(0.5)

        fill = stripes(p["fg_freq"], p["fg_angle"], p["phase"][:, 0]) * (p["fg2"][:, :, None, None] - fg)
        fill += fg
        ground = stripes(p["bg_freq"], p["bg_angle"], p["phase"][:, 1]) * (0.8 * (p["bg2"][:, :, None, None] - bg))
        ground += bg
    img = (fill - ground).mul_(alpha / 255.0)
    img += ground
    return img


def stroke_variants(masks: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """uint8 [4, M, R, R]: every mask eroded by one unit, as is, dilated by one and by two units
    (a unit is one render pixel per 64 of resolution), so instances only index them."""
    res = masks.shape[-1]
    unit = max(1, res // 64)
    out = torch.empty((4, *masks.shape), dtype=torch.uint8)
    for i in range(0, masks.shape[0], chunk):
        m = masks[i : i + chunk]
        out[0, i : i + chunk] = _erode(m, unit)
        out[1, i : i + chunk] = m
        out[2, i : i + chunk] = _dilate(m, unit)
        out[3, i : i + chunk] = _dilate(m, 2 * unit)
    return out


def render_instances(
    variants: torch.Tensor,
    mask_rows: torch.Tensor,
    p: dict[str, torch.Tensor],
    style: str,
    size: int,
    noise_bank: torch.Tensor | None = None,
) -> torch.Tensor:
    """A batch of images, uint8 [B, 3, size, size], from stroke variants (see
    :func:`stroke_variants`) of mask rows and per-instance parameters.

    The warp samples the masks (rendered at twice ``size``) on a ``size`` grid; with bilinear
    sampling each output pixel is the mean of the 2x2 render pixels it covers (area down-sampling)."""
    res = variants.shape[-1]
    unit = max(1, res // 64)
    m = variants[p["stroke"] + 1, mask_rows]
    if style in HOLLOW_STYLES:  # hollow glyph: dilation minus erosion (never negative, so no uint8 wrap)
        width = p["width"] * unit
        ring = torch.empty_like(m)
        for w in width.unique().tolist():
            sel = width == w
            ring[sel] = _dilate(m[sel], w) - _erode(m[sel], w)
        m = ring
    grid = affine_grid(_theta(p), size)
    # bilinear sampling is a convex combination, so alpha stays in [0, 255]
    alpha = F.grid_sample(m.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img = _colour(alpha, p, style, noise_bank)
    return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


@contextmanager
def _one_thread():
    """Run torch on one intra-op thread, then restore the setting.

    Generation is a long series of small memory-bound ops: a second thread gains little, and on a
    shared, oversubscribed machine the OpenMP barriers of every op cost ten times the work itself
    (measured: 0.6 s of CPU on one thread vs 10 s on two for the same 10k images)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _validate_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DatasetError(f"glyphs: {name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


class GlyphsDataset:
    """Builder of the ``glyphs`` dataset (registered under ``dfml_bench.datasets``).

    ``images_per_class``: images of each character; ``size``: side of the square RGB images;
    ``scripts``: a subset of :data:`SCRIPT_NAMES` (None = all); ``style``: one of :data:`STYLES`
    ("default": coloured glyph on a coloured ground with a little noise; "outline": hollow glyph on a
    colour gradient; "textured": striped glyph on a striped ground; "natural": like "textured" but the
    colours and stripes are the class's own look, jittered per image, instead of drawn per image;
    "natural-outline": like "outline" with the class's own colours, gradient direction and faint ground
    stripes, the second domain of ``glyphs-fs-multidomain-natural``); ``script_splits``: a different
    assignment of scripts to train/val/test (default :data:`SCRIPT_SPLITS`); ``name``: the dataset's
    name (default "glyphs", or "glyphs-<style>" for a non-default style); ``heldout``: how held-out
    classes are split (:data:`HELDOUT_MODES`: "script", meta-val and meta-test are the classes of their
    own scripts, as Omniglot splits alphabets; "shuffled", meta-val and meta-test are drawn at random
    from one pool of the held-out scripts' classes, as CIFAR-FS splits its classes, so the two are
    exchangeable; needs ``classes_per_split``).
    """

    name = "glyphs"
    description = "embedded: 1,257 glyph classes of 13 writing systems (811/198/248 by script), 60 images each, 32x32"

    def __init__(
        self,
        images_per_class: int = 60,
        size: int = 32,
        scripts: Sequence[str] | None = None,
        style: str = "default",
        script_splits: dict[str, Sequence[str]] | None = None,
        name: str | None = None,
        batch_images: int = 512,
        classes_per_split: dict[str, int] | None = None,
        heldout: str = "script",
    ) -> None:
        self.images_per_class = _validate_int("images_per_class", images_per_class, 1, 100_000)
        self.size = _validate_int("size", size, 8, 256)
        self.batch_images = _validate_int("batch_images", batch_images, 1, 10_000_000)
        if style not in STYLES:
            raise DatasetError(f"glyphs: unknown style {style!r}; choose one of {', '.join(STYLES)}")
        self.style = style
        if scripts is None:
            self.scripts = SCRIPT_NAMES
        else:
            if isinstance(scripts, str):
                raise DatasetError(f"glyphs: scripts must be a sequence of script names, not the string {scripts!r}")
            scripts = tuple(scripts)
            unknown = [s for s in scripts if s not in SCRIPT_NAMES]
            if unknown or not scripts or len(set(scripts)) != len(scripts):
                raise DatasetError(
                    f"glyphs: scripts must be a non-empty list of distinct names from {', '.join(SCRIPT_NAMES)}; "
                    f"got {list(scripts)}" + (f" (unknown: {unknown})" if unknown else "")
                )
            self.scripts = tuple(s for s in SCRIPT_NAMES if s in scripts)  # canonical order
        self.script_splits = self._validate_splits(script_splits if script_splits is not None else SCRIPT_SPLITS)
        self.classes_per_split = self._validate_class_counts(classes_per_split)
        if heldout not in HELDOUT_MODES:
            raise DatasetError(f"glyphs: unknown heldout mode {heldout!r}; choose one of {', '.join(HELDOUT_MODES)}")
        if heldout == "shuffled" and self.classes_per_split is None:
            raise DatasetError("glyphs: heldout='shuffled' draws meta-val and meta-test from one pool and needs "
                               "classes_per_split (e.g. {'train': 64, 'val': 16, 'test': 20})")
        self.heldout = heldout
        if name is None:
            name = "glyphs" if style == "default" else f"glyphs-{style}"
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"glyphs: name must be a non-empty string, got {name!r}")
        self.name = name

    def _validate_splits(self, splits: dict[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
        if set(splits) != set(SPLITS):
            raise DatasetError(f"glyphs: script_splits must have exactly the keys {list(SPLITS)}, got {sorted(splits)}")
        out = {s: tuple(splits[s]) for s in SPLITS}
        seen: dict[str, str] = {}
        for split, names in out.items():
            for n in names:
                if n not in SCRIPT_NAMES:
                    raise DatasetError(f"glyphs: script_splits[{split!r}] names unknown script {n!r}; known: {SCRIPT_NAMES}")
                if n in seen:
                    raise DatasetError(f"glyphs: script {n!r} is in both meta-{seen[n]} and meta-{split}")
                seen[n] = split
        missing = [s for s in self.scripts if s not in seen]
        if missing:
            raise DatasetError(f"glyphs: scripts {missing} are selected but in no split of script_splits")
        chosen = {split: tuple(n for n in names if n in self.scripts) for split, names in out.items()}
        empty = [split for split, names in chosen.items() if not names]
        if empty:
            raise DatasetError(
                f"glyphs: with scripts {list(self.scripts)} meta-{'/'.join(empty)} would be empty "
                f"(split of scripts: {out}); select scripts from every split or pass script_splits"
            )
        return chosen

    @staticmethod
    def _validate_class_counts(counts: dict[str, int] | None) -> dict[str, int] | None:
        if counts is None:
            return None
        if not isinstance(counts, dict) or set(counts) != set(SPLITS):
            raise DatasetError(f"glyphs: classes_per_split must map each of {list(SPLITS)} to a class count, got {counts!r}")
        return {s: _validate_int(f"classes_per_split[{s!r}]", counts[s], 2, 100_000) for s in SPLITS}

    # -- hashing ---------------------------------------------------------------------------------

    def params(self) -> dict:
        return {
            "name": self.name,
            "images_per_class": self.images_per_class,
            "size": self.size,
            "scripts": list(self.scripts),
            "style": self.style,
            "script_splits": {k: list(v) for k, v in self.script_splits.items()},
            **({"classes_per_split": dict(self.classes_per_split)} if self.classes_per_split else {}),
            # only when not the default, so the datasets built before the option keep their hashes
            **({"heldout": self.heldout} if self.heldout != "script" else {}),
        }

    def recipe(self, seed: int, fonts: Sequence[FontFile] | None = None) -> dict:
        """Everything the images depend on: font hashes, generator version, parameters, seed."""
        fonts = fonts if fonts is not None else discover_fonts()
        return {
            "generator": GENERATOR_VERSION,
            "unicode": unicodedata.unidata_version,
            "fonts": {f.name: f.sha256 for f in fonts},
            "min_fonts": MIN_FONTS,
            "duplicate_threshold": DUPLICATE_THRESHOLD,
            "params": self.params(),
            **({"look_weight": LOOK_WEIGHT} if self.style in LOOK_STYLES else {}),
            "seed": int(seed),
        }

    def cache_path(self, recipe_hash: str) -> Path:
        return paths.home() / "datasets" / f"{self.name}-{recipe_hash[:24]}.pt"

    # -- loading ---------------------------------------------------------------------------------

    def load(self, *, seed: int = 0, data_root: str | None = None, scale: str = "cpu") -> ImageDataset:
        """The dataset for ``seed``, from the cache if a valid copy is there, else built and cached.

        ``data_root`` is ignored (the dataset is embedded); ``scale`` ("cpu" or "paper") does not
        change it."""
        if scale not in ("cpu", "paper"):
            raise DatasetError(f"glyphs: scale must be 'cpu' or 'paper', got {scale!r}")
        _validate_int("seed", seed, 0, 2**63 - 1)
        fonts = discover_fonts()
        recipe = self.recipe(seed, fonts)
        recipe_hash = sha256_json(recipe)
        path = self.cache_path(recipe_hash)
        if path.exists():
            ds = self._read_cache(path, recipe_hash)
            if ds is not None:
                return ds
        ds = self.generate(seed=seed, fonts=fonts, recipe=recipe)
        atomic_torch_save(path, self._to_cache(ds))
        return ds

    @staticmethod
    def _to_cache(ds: ImageDataset) -> dict:
        return {
            "name": ds.name,
            "images": ds.images,
            "labels": ds.labels,
            "class_names": ds.class_names,
            "splits": ds.splits,
            "mean": list(ds.mean),
            "std": list(ds.std),
            "hash": ds.hash,
            "meta": ds.meta,
        }

    def _read_cache(self, path: Path, recipe_hash: str) -> ImageDataset | None:
        """The cached dataset, or None (with a warning) if the file is unreadable or does not match."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj["meta"]["recipe_hash"] != recipe_hash:
                raise ValueError("recipe hash differs")
            expected = dataset_hash(recipe_hash, obj["images"], obj["labels"], obj["class_names"], obj["splits"])
            if expected != obj["hash"]:
                raise ValueError("content hash differs (file corrupted)")
            return ImageDataset(
                name=obj["name"],
                images=obj["images"],
                labels=obj["labels"],
                class_names=list(obj["class_names"]),
                splits={k: list(v) for k, v in obj["splits"].items()},
                mean=tuple(obj["mean"]),
                std=tuple(obj["std"]),
                hash=obj["hash"],
                meta=obj["meta"],
            )
        except Exception as exc:  # any failure means: rebuild
            log.warning("glyphs: cached dataset %s is unusable (%s: %s); regenerating", path, type(exc).__name__, exc)
            return None

    def generate(self, *, seed: int = 0, fonts: Sequence[FontFile] | None = None, recipe: dict | None = None) -> ImageDataset:
        """Build the dataset in memory (no cache), on one CPU thread (see :func:`_one_thread`)."""
        with _one_thread():
            return self._generate(seed=seed, fonts=fonts, recipe=recipe)

    def _generate(self, *, seed: int, fonts: Sequence[FontFile] | None, recipe: dict | None) -> ImageDataset:
        t0 = time.perf_counter()
        fonts = tuple(fonts) if fonts is not None else discover_fonts()
        recipe = recipe if recipe is not None else self.recipe(seed, fonts)
        recipe_hash = sha256_json(recipe)
        cat = build_catalogue(fonts)
        res = RENDER_SCALE * self.size
        variants, offsets, counts = _class_variants(fonts, res)

        chosen = [i for i, c in enumerate(cat.classes) if c.script in self.scripts]
        if self.classes_per_split is not None:
            split_of_index = select_classes(cat.classes, chosen, self.script_splits, self.classes_per_split, self.heldout)
            chosen = sorted(split_of_index)
        else:
            split_by_script = {s: split for split, names in self.script_splits.items() for s in names}
            split_of_index = {i: split_by_script[cat.classes[i].script] for i in chosen}
        classes = [cat.classes[i] for i in chosen]
        n = self.images_per_class
        images = torch.empty((len(classes) * n, 3, self.size, self.size), dtype=torch.uint8)
        noise_bank = None
        if self.style == "default":
            g = make_generator(derive_seed("glyphs", GENERATOR_VERSION, "noise", int(seed)))
            noise_bank = torch.randn((NOISE_BANK, 3, self.size, self.size), generator=g)
        per_batch = max(1, self.batch_images // n)  # ~512 images a batch: tensors stay in cache
        for start in range(0, len(classes), per_batch):
            block = range(start, min(start + per_batch, len(classes)))
            plist, rows = [], []
            for ci in block:
                cls = classes[ci]
                g = make_generator(derive_seed("glyphs", GENERATOR_VERSION, self.style, int(seed), cls.name))
                k = chosen[ci]
                look = None
                if self.style in LOOK_STYLES:  # the class's look, from its own stream (instances do not move it)
                    look = sample_class_look(make_generator(derive_seed("glyphs", GENERATOR_VERSION, "look", int(seed), cls.name)))
                p = sample_instance_params(g, n, int(counts[k]), self.style, look)
                rows.append(offsets[k] + p["font"])
                plist.append(p)
            p = {key: torch.cat([q[key] for q in plist]) for key in plist[0]}
            out = render_instances(variants, torch.cat(rows), p, self.style, self.size, noise_bank)
            images[block.start * n : block.stop * n] = out
        labels = torch.arange(len(classes), dtype=torch.int64).repeat_interleave(n)
        class_names = [c.name for c in classes]
        splits = {split: [i for i, k in enumerate(chosen) if split_of_index[k] == split] for split in SPLITS}
        train = set(splits["train"])
        runs = [list(g) for _, g in itertools.groupby(range(len(classes)), key=lambda i: i in train)]
        mean, std = channel_stats([images[r[0] * n : (r[-1] + 1) * n] for r in runs if r[0] in train])
        h = dataset_hash(recipe_hash, images, labels, class_names, splits)
        per_script = {s: sum(c.script == s for c in classes) for s in self.scripts}
        removed_per_script = {s: sum(k.split(":")[0] == s and v != "empty" for k, v in cat.removed.items()) for s in SCRIPT_NAMES}
        meta = {
            "generator": GENERATOR_VERSION,
            "recipe": recipe,
            "recipe_hash": recipe_hash,
            "style": self.style,
            "scripts_per_split": {k: list(v) for k, v in self.script_splits.items()},
            "heldout": self.heldout,
            "classes_per_script": per_script,
            "classes_per_split": {k: len(v) for k, v in splits.items()},
            "candidates_per_script": dict(cat.n_candidates),
            "duplicates_removed": sum(v != "empty" for v in cat.removed.values()),
            "blank_removed": sorted(k for k, v in cat.removed.items() if v == "empty"),
            "duplicates_removed_per_script": removed_per_script,
            "duplicate_threshold": DUPLICATE_THRESHOLD,
            "font_sha256": {f.name: f.sha256 for f in fonts},
            "fonts_used": sorted({fonts[k].name for c in classes for k in c.fonts}),
            "pillow": _pil_versions(),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        return ImageDataset(
            name=self.name,
            images=images,
            labels=labels,
            class_names=class_names,
            splits=splits,
            mean=mean,
            std=std,
            hash=h,
            meta=meta,
        )


def select_classes(catalogue: Sequence[GlyphClass], chosen: Sequence[int], script_splits: dict[str, tuple[str, ...]],
                   counts: dict[str, int], heldout: str = "script") -> dict[int, str]:
    """A fixed subset of the catalogue indices ``chosen``, each mapped to its split: ``counts[split]``
    classes of each split, drawn uniformly (seeded by the generator version only, so the class set never
    depends on the image seed). Too few classes in a split is an error, not a smaller split.

    ``heldout="script"``: each split's classes come from its own scripts. ``heldout="shuffled"``: the
    meta-train draw is the same; meta-val and meta-test are one uniform draw of ``counts["val"] +
    counts["test"]`` classes from the pooled val and test scripts, the first ``counts["val"]`` of the draw
    going to meta-val: the two splits are exchangeable (as CIFAR-FS's random class split) and both stay
    unseen in meta-train."""
    if heldout not in HELDOUT_MODES:
        raise DatasetError(f"glyphs: unknown heldout mode {heldout!r}; choose one of {', '.join(HELDOUT_MODES)}")
    split_of = {s: split for split, names in script_splits.items() for s in names}

    def draw(pool: list[int], n: int, what: str, *key: str) -> list[int]:
        if n > len(pool):
            raise DatasetError(f"glyphs: classes_per_split asks for {n} {what} classes but the selected scripts have only {len(pool)}")
        g = make_generator(derive_seed("glyphs-select", GENERATOR_VERSION, *key))
        return [pool[j] for j in torch.randperm(len(pool), generator=g)[:n].tolist()]

    out: dict[int, str] = {}
    if heldout == "script":
        for split in SPLITS:
            pool = [i for i in chosen if split_of.get(catalogue[i].script) == split]
            out.update((i, split) for i in draw(pool, counts[split], f"meta-{split}", split))
        return out
    pool = [i for i in chosen if split_of.get(catalogue[i].script) == "train"]
    out.update((i, "train") for i in draw(pool, counts["train"], "meta-train", "train"))
    pool = [i for i in chosen if split_of.get(catalogue[i].script) in ("val", "test")]
    pick = draw(pool, counts["val"] + counts["test"], "held-out (meta-val + meta-test)", "heldout-shuffled")
    out.update((i, "val") for i in pick[: counts["val"]])
    out.update((i, "test") for i in pick[counts["val"]:])
    return out


class GlyphsFS(GlyphsDataset):
    """``glyphs-fs``: the glyph dataset in CIFAR-FS's shape, the ``cpu`` proxy of the papers' setting.

    64 / 16 / 20 meta-train / meta-val / meta-test classes (a fixed uniform draw from the scripts of each
    split, :func:`select_classes`), 600 images per class, 32x32 RGB. With a zoo of 5-way teachers over the
    64 meta-train classes, every class is seen by several teachers and each teacher learns from 480 images
    per class, as in CIFAR-FS with its 100-model pool (``docs/proxy-validation.md``)."""

    name = "glyphs-fs"
    description = "embedded, CIFAR-FS's shape: 64/16/20 glyph classes (by script), 600 images each, 32x32 (the cpu proxy before issue 12's study)"

    def __init__(self, images_per_class: int = 600, size: int = 32, style: str = "default",
                 classes_per_split: dict[str, int] | None = None, name: str | None = None, batch_images: int = 512,
                 heldout: str = "script") -> None:
        super().__init__(images_per_class=images_per_class, size=size, style=style, batch_images=batch_images,
                         classes_per_split=classes_per_split or dict(CIFAR_FS_CLASSES), heldout=heldout,
                         name=name or ("glyphs-fs" if style == "default" else f"glyphs-fs-{style}"))


CIFAR_FS_CLASSES = {"train": 64, "val": 16, "test": 20}


class GlyphsFSNatural(GlyphsFS):
    """``glyphs-fs-natural``: ``glyphs-fs`` with class-conditional colour and texture (the ``natural``
    style): each class has its own ink and ground colours and stripe frequencies and orientations,
    jittered per image, as natural image classes have colour and texture statistics of their own.

    The second candidate proxy of issue 12: on ``glyphs-fs`` a class is a shape only, its teachers
    reach 100 % from a few strokes, and exact inversions carry no knowledge that transfers
    (``docs/proxy-validation.md``)."""

    name = "glyphs-fs-natural"
    description = "the cpu proxy: glyphs-fs with class-conditional colour and texture, 64/16/20 classes, 600 images each, 32x32"

    def __init__(self, images_per_class: int = 600, size: int = 32, batch_images: int = 512) -> None:
        super().__init__(images_per_class=images_per_class, size=size, style="natural", batch_images=batch_images)


class GlyphsFSNaturalShuffled(GlyphsFS):
    """``glyphs-fs-natural-shuffled``: ``glyphs-fs-natural`` with meta-val and meta-test drawn at random
    from one pool of the held-out scripts' classes (``heldout="shuffled"``), as CIFAR-FS splits its
    classes at random, instead of meta-val and meta-test each holding their own scripts.

    Why: on ``glyphs-fs-natural`` meta-val (Greek, Georgian, Old Italic, Hebrew: two of them Latin's
    relatives, and Latin is in meta-train) promised 0.6-5.7 points more gain than meta-test (Armenian,
    Arabic, Lao, Braille) showed, for several methods and in every suite, and fresh meta-val episodes kept
    the gap (``docs/model-selection.md``): checkpoints were chosen on a split that is not a sample of
    the one they are tested on. Here the two are exchangeable. The meta-train classes and their images
    are those of ``glyphs-fs-natural`` (same draw, same per-class streams, same normalisation), and
    every held-out class is still unseen in meta-train."""

    name = "glyphs-fs-natural-shuffled"
    description = ("the cpu proxy: glyphs-fs-natural with meta-val and meta-test drawn at random from the held-out "
                   "scripts' classes (exchangeable, as CIFAR-FS), 64/16/20 classes, 600 images each, 32x32")

    def __init__(self, images_per_class: int = 600, size: int = 32, batch_images: int = 512) -> None:
        super().__init__(images_per_class=images_per_class, size=size, style="natural", batch_images=batch_images,
                         heldout="shuffled", name="glyphs-fs-natural-shuffled")


def _pil_versions() -> dict[str, str]:
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype": str(features.version("freetype2"))}


def channel_stats(parts: torch.Tensor | Sequence[torch.Tensor], chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, of uint8 images [N, C, H, W] (one tensor or several,
    e.g. views of the meta-train rows), from exact integer histograms: the same on every machine."""
    parts = [parts] if isinstance(parts, torch.Tensor) else list(parts)
    c = parts[0].shape[1]
    hist = torch.zeros((c, 256), dtype=torch.int64)
    for part in parts:
        for i in range(0, part.shape[0], chunk):
            for ch in range(c):
                hist[ch] += torch.bincount(part[i : i + chunk, ch].reshape(-1), minlength=256)
    count = int(hist[0].sum())
    if count == 0:
        raise DatasetError("glyphs: no meta-train images to compute the normalisation from")
    values = torch.arange(256, dtype=torch.int64)
    mean, std = [], []
    for h in hist:
        m = int((h * values).sum()) / count / 255.0
        v = max(int((h * values * values).sum()) / count / 255.0**2 - m * m, 0.0)
        mean.append(round(m, 6))
        std.append(round(v**0.5, 6))
    return tuple(mean), tuple(std)


def dataset_hash(recipe_hash: str, images: torch.Tensor, labels: torch.Tensor, class_names, splits) -> str:
    """The dataset hash: the recipe (fonts, version, parameters, seed) plus the exact content."""
    return sha256_json(
        {
            "recipe": recipe_hash,
            "images": sha256_tensor(images),
            "labels": sha256_tensor(labels),
            "class_names": list(class_names),
            "splits": {k: list(v) for k, v in splits.items()},
        }
    )

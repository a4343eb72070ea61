"""The embedded ``glyphs`` dataset: size, split by script, determinism, de-duplication, hashing, cache."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from dfml_bench.datasets import DatasetError, validate_split
from dfml_bench.datasets import glyphs as G
from dfml_bench.datasets.show import save_grid

PER_CLASS = 3
SUBSET = ("coptic", "hebrew", "lao")  # one small script in each split


def script_of(name: str) -> str:
    return name.split(":")[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("glyphs_home")
        mp.setenv("DFML_BENCH_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def ds(home):
    return G.GlyphsDataset(images_per_class=PER_CLASS).load(seed=0)


def test_size_and_scripts(ds):
    n_classes = len(ds.class_names)
    scripts = {script_of(n) for n in ds.class_names}
    assert n_classes >= 600
    assert len(scripts) >= 12
    assert scripts == set(G.SCRIPT_NAMES)
    assert len(set(ds.class_names)) == n_classes
    assert all(n.split(":")[1].startswith("U+") for n in ds.class_names)
    assert ds.meta["duplicates_removed"] > 0
    assert sum(ds.meta["classes_per_script"].values()) == n_classes


def test_shapes_and_dtypes(ds):
    n_classes = len(ds.class_names)
    assert ds.images.dtype == torch.uint8
    assert tuple(ds.images.shape) == (n_classes * PER_CLASS, 3, 32, 32)
    assert ds.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.labels, minlength=n_classes), torch.full((n_classes,), PER_CLASS))
    # every image has a visible glyph: the two colours are far apart somewhere in the image
    x = ds.images.float()
    spread = (x.amax((2, 3)) - x.amin((2, 3))).amax(1)
    assert bool((spread > 60).all())


def test_split_by_script(ds):
    validate_split(ds.splits)
    all_ids = set(range(len(ds.class_names)))
    assert set().union(*map(set, ds.splits.values())) == all_ids
    scripts = {s: {script_of(ds.class_names[c]) for c in ids} for s, ids in ds.splits.items()}
    for a, b in itertools.combinations(scripts, 2):
        assert not scripts[a] & scripts[b], f"script in both meta-{a} and meta-{b}"
    assert {s: set(v) for s, v in G.SCRIPT_SPLITS.items()} == scripts
    frac = {s: len(v) / len(all_ids) for s, v in ds.splits.items()}
    assert abs(frac["train"] - 0.64) < 0.04 and abs(frac["val"] - 0.16) < 0.04 and abs(frac["test"] - 0.20) < 0.04


def test_normalisation_from_meta_train(ds):
    train = torch.isin(ds.labels, torch.tensor(ds.splits["train"]))
    x = ds.images[train].double() / 255
    assert torch.allclose(torch.tensor(ds.mean, dtype=torch.float64), x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(ds.std, dtype=torch.float64), x.std((0, 2, 3), unbiased=False), atol=1e-5)


def test_every_class_in_enough_fonts(ds):
    cat = G.build_catalogue()
    by_name = {c.name: c for c in cat.classes}
    for name in ds.class_names:
        cls = by_name[name]
        assert len(cls.fonts) >= G.MIN_FONTS
        assert all(cls.codepoint in cat.fonts[k].cmap for k in cls.fonts)  # no tofu: the font has the glyph


def test_no_near_duplicates(ds):
    cat = G.build_catalogue()
    assert [c.name for c in cat.classes] == ds.class_names  # full dataset keeps catalogue order
    # recompute canonical masks independently of the catalogue's cache
    font = G._pil_font(next(f.path for f in cat.fonts if f.name == G.CANONICAL_FONT), 4 * G.CANONICAL_SIZE)
    masks = torch.stack(
        [torch.from_numpy(G.render_fit(font, c.char, G.CANONICAL_SIZE, G.CANONICAL_BOX).copy()) for c in cat.classes]
    )
    assert torch.equal(masks, cat.canonical)
    flat = masks.reshape(len(masks), -1).long()
    d = G.mask_distances(flat, flat)
    d.fill_diagonal_(float("inf"))
    assert float(d.min()) > G.DUPLICATE_THRESHOLD
    names = set(ds.class_names)
    # Latin A / Greek Alpha / Cyrillic A are one class (kept in Latin, the first script)
    assert "latin:U+0041" in names and "greek:U+0391" not in names and "cyrillic:U+0410" not in names
    assert not {"latin:U+006F", "latin:U+004F"} <= names  # o and O differ only by size
    assert cat.removed["cyrillic:U+0410"] == "latin:U+0041"


def test_mask_distance_is_jaccard_on_binary():
    a = torch.zeros(1, 16, dtype=torch.long)
    b = torch.zeros(1, 16, dtype=torch.long)
    a[0, :8] = 255
    b[0, 4:12] = 255
    assert float(G.mask_distances(a, b)) == pytest.approx(1 - 4 / 12)
    assert float(G.mask_distances(a, a)) == 0.0


def test_deterministic_and_seed_dependent(ds):
    builder = G.GlyphsDataset(images_per_class=PER_CLASS, scripts=SUBSET)
    a = builder.generate(seed=0)
    b = builder.generate(seed=0)
    c = builder.generate(seed=1)
    assert torch.equal(a.images, b.images) and a.hash == b.hash
    assert a.hash != c.hash and not torch.equal(a.images, c.images)
    assert a.class_names == c.class_names  # the class set does not depend on the seed
    # a class's images do not depend on which other scripts are built
    for name in ("hebrew:U+05D0", "lao:U+0E81"):
        i, j = a.class_names.index(name), ds.class_names.index(name)
        assert torch.equal(a.images[a.labels == i], ds.images[ds.labels == j])


def test_styles_are_different(ds):
    out = G.GlyphsDataset(images_per_class=PER_CLASS, scripts=SUBSET, style="outline").generate(seed=0)
    plain = G.GlyphsDataset(images_per_class=PER_CLASS, scripts=SUBSET).generate(seed=0)
    assert out.name == "glyphs-outline" and plain.name == "glyphs"
    assert out.class_names == plain.class_names and out.hash != plain.hash
    assert (out.images.float() - plain.images.float()).abs().mean() > 20


def test_hash_covers_font_hashes(home, monkeypatch):
    builder = G.GlyphsDataset(images_per_class=PER_CLASS, scripts=SUBSET)
    before = builder.load(seed=0)
    real = G.font_sha256

    def fake(path):
        return "0" * 64 if str(path).endswith("DejaVuSans-Bold.ttf") else real(path)

    monkeypatch.setattr(G, "font_sha256", fake)
    after = builder.load(seed=0)
    assert after.meta["font_sha256"]["DejaVuSans-Bold.ttf"] == "0" * 64
    assert torch.equal(before.images, after.images)  # same pixels ...
    assert before.hash != after.hash  # ... but a different font file means a different dataset
    assert builder.cache_path(before.meta["recipe_hash"]) != builder.cache_path(after.meta["recipe_hash"])


def test_recipe_covers_parameters_and_seed():
    fonts = G.discover_fonts()
    base = G.GlyphsDataset(scripts=SUBSET)
    h0 = G.sha256_json(base.recipe(0, fonts))
    others = [
        base.recipe(1, fonts),
        G.GlyphsDataset(scripts=SUBSET, images_per_class=61).recipe(0, fonts),
        G.GlyphsDataset(scripts=SUBSET, size=28).recipe(0, fonts),
        G.GlyphsDataset(scripts=SUBSET, style="textured").recipe(0, fonts),
        G.GlyphsDataset(scripts=SUBSET + ("greek",)).recipe(0, fonts),
        G.GlyphsDataset(scripts=SUBSET, name="glyphs-x").recipe(0, fonts),
    ]
    assert len({h0, *(G.sha256_json(r) for r in others)}) == len(others) + 1
    assert base.recipe(0, fonts)["generator"] == G.GENERATOR_VERSION


def test_cache_reuse_and_corruption(home, monkeypatch):
    builder = G.GlyphsDataset(images_per_class=2, scripts=SUBSET)
    first = builder.load(seed=3)
    path = builder.cache_path(first.meta["recipe_hash"])
    assert path.exists() and path.parent == home / "datasets"

    calls = []
    real_generate = G.GlyphsDataset.generate

    def counting(self, **kw):
        calls.append(kw)
        return real_generate(self, **kw)

    monkeypatch.setattr(G.GlyphsDataset, "generate", counting)
    again = builder.load(seed=3)
    assert calls == [] and again.hash == first.hash and torch.equal(again.images, first.images)

    # a truncated file is detected and regenerated
    path.write_bytes(path.read_bytes()[:1000])
    fixed = builder.load(seed=3)
    assert len(calls) == 1 and fixed.hash == first.hash and torch.equal(fixed.images, first.images)
    # a file whose images were altered (still a valid torch file) fails its content hash
    obj = torch.load(path, weights_only=True)
    obj["images"][0, 0, 0, 0] ^= 1
    torch.save(obj, path)
    fixed = builder.load(seed=3)
    assert len(calls) == 2 and torch.equal(fixed.images, first.images)
    assert torch.equal(torch.load(path, weights_only=True)["images"], first.images)  # rewritten


def test_validation_errors():
    bad = [
        dict(images_per_class=0),
        dict(images_per_class=2.5),
        dict(size="32"),
        dict(style="neon"),
        dict(scripts=("klingon",)),
        dict(scripts="latin"),
        dict(scripts=()),
        dict(scripts=("latin",)),  # meta-val and meta-test would be empty
        dict(script_splits={"train": ("latin",), "val": ("latin",), "test": ("greek",)}),
        dict(name=""),
    ]
    for kw in bad:
        with pytest.raises(DatasetError):
            G.GlyphsDataset(**kw)
    with pytest.raises(DatasetError, match="scale"):
        G.GlyphsDataset(scripts=SUBSET).load(scale="gpu")


def test_script_groups_are_disjoint_and_valid():
    a, b = (set(v) for v in G.SCRIPT_GROUPS.values())
    assert not a & b and a | b == set(G.SCRIPT_NAMES)
    for group in G.SCRIPT_GROUPS.values():
        builder = G.GlyphsDataset(scripts=group)  # raises if a split would be empty
        assert all(builder.script_splits[s] for s in ("train", "val", "test"))


def test_custom_script_splits():
    builder = G.GlyphsDataset(
        images_per_class=2, scripts=SUBSET, script_splits={"train": ("hebrew",), "val": ("lao",), "test": ("coptic",)}
    )
    d = builder.generate(seed=0)
    assert {script_of(d.class_names[c]) for c in d.splits["test"]} == {"coptic"}


def test_registered_entry_point():
    from dfml_bench.registry import load_group

    entry = load_group("dfml_bench.datasets").get("glyphs")
    if entry is None:
        pytest.skip("dfml-bench is not installed, so its entry points are not visible")
    assert entry.error is None and entry.obj is G.GlyphsDataset and G.GlyphsDataset().name == "glyphs"


def test_save_grid(ds, tmp_path):
    path = save_grid(ds, tmp_path / "grid.png", classes_per_split=4, per_class=5, seed=1)
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG" and im.mode == "RGB"
        px = torch.from_numpy(np.asarray(im).copy()).float()
    tile = 64  # 32-pixel images are drawn at zoom 2
    assert h == 26 + 3 * 22 + 3 * 4 * (tile + 2) + 2
    assert w > 5 * (tile + 2)
    assert px.std() > 10  # not a blank canvas
    with pytest.raises(DatasetError):
        save_grid(ds, tmp_path / "bad.png", per_class=0)


def _colour_1nn(ds, episodes: int = 300, seed: int = 0) -> float:
    """5-way 1-shot accuracy of a 1-NN on images' per-channel colour means and deviations (chance 0.2):
    how much colour alone says about the class."""
    g = torch.Generator().manual_seed(seed)
    x = ds.images.float() / 255
    feat = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    hits = []
    for _ in range(episodes):
        classes = torch.randperm(len(ds.class_names), generator=g)[:5]
        support, query = [], []
        for c in classes:
            idx = (ds.labels == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            support.append(feat[idx[0]])
            query.append(feat[idx[1:6]])
        pred = torch.cdist(torch.cat(query), torch.stack(support)).argmin(1)
        hits.append((pred == torch.arange(5).repeat_interleave(5)).float().mean())
    return float(torch.stack(hits).mean())


def test_natural_style_gives_each_class_its_own_look():
    natural = G.GlyphsDataset(images_per_class=8, scripts=SUBSET, style="natural").generate(seed=0)
    plain = G.GlyphsDataset(images_per_class=8, scripts=SUBSET).generate(seed=0)
    assert natural.name == "glyphs-natural" and natural.class_names == plain.class_names
    # colour is a weak class cue in the natural style and a per-image nuisance in the default one
    plain_1nn = _colour_1nn(plain)
    assert plain_1nn < 0.26 and _colour_1nn(natural) > plain_1nn + 0.05
    again = G.GlyphsDataset(images_per_class=8, scripts=SUBSET, style="natural").generate(seed=0)
    assert torch.equal(natural.images, again.images)
    # a class's look comes from its own stream: its images do not depend on which other scripts are built
    wider = G.GlyphsDataset(images_per_class=8, scripts=SUBSET + ("greek",), style="natural").generate(seed=0)
    i, j = natural.class_names.index("hebrew:U+05D0"), wider.class_names.index("hebrew:U+05D0")
    assert torch.equal(natural.images[natural.labels == i], wider.images[wider.labels == j])
    with pytest.raises(DatasetError, match="class look"):
        G.sample_instance_params(torch.Generator().manual_seed(0), 2, 1, "natural")


def test_glyphs_fs_natural_is_registered_in_cifar_fs_shape():
    from dfml_bench.registry import load_group

    builder = G.GlyphsFSNatural()
    assert builder.name == "glyphs-fs-natural" and builder.style == "natural" and builder.images_per_class == 600
    assert builder.classes_per_split == G.CIFAR_FS_CLASSES
    entry = load_group("dfml_bench.datasets").get("glyphs-fs-natural")
    if entry is None:
        pytest.skip("dfml-bench is not installed, so its entry points are not visible")
    assert entry.error is None and entry.obj is G.GlyphsFSNatural


def test_natural_outline_style_is_hollow_with_the_class_look():
    look_style = G.GlyphsDataset(images_per_class=8, scripts=SUBSET, style="natural-outline").generate(seed=0)
    outline = G.GlyphsDataset(images_per_class=8, scripts=SUBSET, style="outline").generate(seed=0)
    assert look_style.name == "glyphs-natural-outline" and look_style.class_names == outline.class_names
    # colour is a class cue here (the class's colours and gradient) and a per-image nuisance in "outline"
    assert _colour_1nn(look_style) > _colour_1nn(outline) + 0.05
    again = G.GlyphsDataset(images_per_class=8, scripts=SUBSET, style="natural-outline").generate(seed=0)
    assert torch.equal(look_style.images, again.images)
    assert look_style.meta["recipe"]["look_weight"] == G.LOOK_WEIGHT
    with pytest.raises(DatasetError, match="class look"):
        G.sample_instance_params(torch.Generator().manual_seed(0), 2, 1, "natural-outline")


def test_class_look_keeps_the_natural_style_draws_first():
    # "grad_angle" (natural-outline only) is drawn last, so the natural style's looks, and with them
    # glyphs-fs-natural's images and the records on it, did not change when it was added
    look = G.sample_class_look(torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    first = [torch.rand(3, generator=g) for _ in range(4)]
    assert all(torch.equal(look[k], v) for k, v in zip(("fg", "bg", "fg2", "bg2"), first))
    assert list(look)[-1] == "grad_angle"


def test_shuffled_heldout_split_is_exchangeable_and_keeps_meta_train():
    """heldout="shuffled" (issue 12): meta-val and meta-test are one random draw from the held-out scripts'
    classes, so both mix scripts; meta-train (classes, images, normalisation) is that of the script split,
    and no held-out class is in meta-train."""
    counts = {"train": 12, "val": 8, "test": 10}
    kw = dict(images_per_class=4, style="natural", classes_per_split=counts)
    by_script = G.GlyphsDataset(**kw).generate(seed=0)
    shuffled = G.GlyphsDataset(**kw, heldout="shuffled", name="glyphs-shuffled").generate(seed=0)
    assert {s: len(v) for s, v in shuffled.splits.items()} == counts
    names = {s: [shuffled.class_names[i] for i in v] for s, v in shuffled.splits.items()}
    assert names["train"] == [by_script.class_names[i] for i in by_script.splits["train"]]
    for a, b in zip(by_script.splits["train"], shuffled.splits["train"]):
        assert torch.equal(by_script.images[by_script.labels == a], shuffled.images[shuffled.labels == b])
    assert shuffled.mean == by_script.mean and shuffled.std == by_script.std
    heldout_scripts = set(G.SCRIPT_SPLITS["val"]) | set(G.SCRIPT_SPLITS["test"])
    for split in ("val", "test"):
        assert {script_of(n) for n in names[split]} <= heldout_scripts
    assert not set(names["val"]) & set(names["test"]) and not (set(names["val"]) | set(names["test"])) & set(names["train"])
    # a draw from one pool: meta-val holds classes of the script split's test scripts and vice versa
    assert {script_of(n) for n in names["val"]} & set(G.SCRIPT_SPLITS["test"])
    assert {script_of(n) for n in names["test"]} & set(G.SCRIPT_SPLITS["val"])
    assert shuffled.meta["heldout"] == "shuffled" and shuffled.hash != by_script.hash
    # the default keeps the recipe (and so the hashes) of datasets built before the option existed
    assert "heldout" not in G.GlyphsDataset(**kw).params() and G.GlyphsDataset(**kw, heldout="shuffled").params()["heldout"] == "shuffled"
    with pytest.raises(DatasetError, match="needs classes_per_split"):
        G.GlyphsDataset(heldout="shuffled")
    with pytest.raises(DatasetError, match="unknown heldout mode"):
        G.GlyphsDataset(classes_per_split=counts, heldout="by-class")
    with pytest.raises(DatasetError, match="held-out"):
        G.GlyphsDataset(images_per_class=2, classes_per_split={"train": 12, "val": 400, "test": 100}, heldout="shuffled").generate(seed=0)


def test_glyphs_fs_natural_shuffled_is_the_registered_cpu_proxy():
    from dfml_bench.registry import load_group
    from dfml_bench.suites import common

    builder = G.GlyphsFSNaturalShuffled()
    assert (builder.name, builder.style, builder.heldout, builder.classes_per_split) == (
        "glyphs-fs-natural-shuffled", "natural", "shuffled", G.CIFAR_FS_CLASSES)
    assert common.CPU_PROXY_DATASET == "glyphs-fs-natural-shuffled"
    entry = load_group("dfml_bench.datasets").get("glyphs-fs-natural-shuffled")
    if entry is None:
        pytest.skip("dfml-bench is not installed, so its entry points are not visible")
    assert entry.error is None and entry.obj is G.GlyphsFSNaturalShuffled

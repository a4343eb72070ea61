"""Real datasets on tiny fixtures in every supported layout: loading, splits, resolution, normalisation,
the decode cache, prepare (atomic, idempotent, interrupted), check's diagnostics and the missing-data error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torchvision.io import decode_image, encode_jpeg

import fixture_data as fx
from dfml_bench.cli import main as cli
from dfml_bench.datasets import DatasetError
from dfml_bench.datasets import prepare as prep
from dfml_bench.datasets import real
from dfml_bench.datasets.real import CUB, CifarFS, MiniImageNet, standard_split
from dfml_bench.registry import register

for _name, _cls in real.LOADERS.items():  # visible even before `pip install -e` refreshes entry points
    register("dfml_bench.datasets", _name, _cls)

COUNTS = {"train": 6, "val": 3, "test": 5}
# the fixtures are written with torchvision's codecs, deprecated in 0.29 (the library silences it itself)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


# ------------------------------------------------------------------------------------- standard splits


def test_embedded_splits_have_the_standard_counts_and_sources():
    for name, want in (("cifar-fs", (64, 16, 20)), ("mini-imagenet", (64, 16, 20)), ("cub", (100, 50, 50))):
        d = standard_split(name)
        assert tuple(len(d["splits"][s]) for s in ("train", "val", "test")) == want
        allc = [c for s in d["splits"].values() for c in s]
        assert len(set(allc)) == sum(want), f"{name}: a class is in two splits"
        assert len(d["source"]) > 40
    cifar = standard_split("cifar-fs")["splits"]
    assert {"whale", "bed", "baby", "rocket"} <= set(cifar["test"]) and {"beaver", "tractor"} <= set(cifar["val"])
    mini = standard_split("mini-imagenet")["splits"]
    assert all(w.startswith("n") and len(w) == 9 for s in mini.values() for w in s)
    assert "n01930112" in mini["test"] and "n09256479" in mini["val"]
    cub = standard_split("cub")["splits"]  # CloserLook: sorted index i = number - 1
    assert all((n - 1) % 2 == 0 for n in cub["train"]) and all((n - 1) % 4 == 1 for n in cub["val"])
    assert all((n - 1) % 4 == 3 for n in cub["test"]) and sorted(sum(cub.values(), [])) == list(range(1, 201))


# ------------------------------------------------------------------------------------------- loading


def _split_names(ds):
    return {s: [ds.class_names[i] for i in ids] for s, ids in ds.splits.items()}


def test_cifar_fs_dfml_folder_layout_with_mete_typo(tmp_path):
    fx.split_folder_layout(tmp_path, "cifar-fs", "cifar100", COUNTS, 4, (32, 32),
                           split_dirs={"train": "mete_train", "val": "mete_val", "test": "mete_test"})
    ds = CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))
    assert ds.images.shape == (14 * 4, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.mean == (0.5071, 0.4867, 0.4408) and ds.std == (0.2675, 0.2565, 0.2761)
    names = _split_names(ds)
    std = fx.pick_classes("cifar-fs", COUNTS)
    assert {s: sorted(v) for s, v in names.items()} == {s: sorted(v) for s, v in std.items()}
    assert ds.splits["train"] == list(range(6))  # train classes first, consecutive ids
    assert ds.meta["layout"] == "split-folders" and ds.meta["subset"] is True
    # the stored PNG pixels come back exactly (no resize at native resolution)
    f = sorted((tmp_path / "cifar100" / "mete_train" / names["train"][0]).iterdir())[0]
    assert torch.equal(ds.images[ds.class_indices(0)[0]], decode_image(str(f)))


def test_split_comes_from_the_standard_list_not_the_layout(tmp_path):
    """The same classes as per-split folders or as one flat folder of classes give the same dataset."""
    a, b = tmp_path / "a", tmp_path / "b"
    fx.split_folder_layout(a, "cifar-fs", "cifar-fs", COUNTS, 3, (32, 32))
    (b / "cifar-fs" / "data").mkdir(parents=True)
    for sd in (a / "cifar-fs").iterdir():
        for c in sd.iterdir():
            shutil.copytree(c, b / "cifar-fs" / "data" / c.name)
    da = CifarFS(allow_subset=True, progress=False).load(data_root=str(a))
    db = CifarFS(allow_subset=True, progress=False).load(data_root=str(b))
    assert db.meta["layout"] == "class-folders"
    assert da.class_names == db.class_names and da.splits == db.splits and da.hash == db.hash


def test_a_class_in_the_wrong_split_folder_is_an_error(tmp_path):
    base = fx.split_folder_layout(tmp_path, "cifar-fs", "cifar-fs", COUNTS, 2, (32, 32))
    test_cls = fx.pick_classes("cifar-fs", COUNTS)["test"][0]
    shutil.move(base / "meta_test" / test_cls, base / "meta_train" / test_cls)
    with pytest.raises(DatasetError, match=rf"class {test_cls} is in the layout's meta-train but the standard split puts it in meta-test"):
        CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))


def test_unknown_class_folder_is_an_error(tmp_path):
    base = fx.split_folder_layout(tmp_path, "cifar-fs", "cifar-fs", COUNTS, 2, (32, 32))
    fx.write_image(base / "meta_train" / "spaceship" / "x.png", fx.class_images(1, 32, 32, 0)[0])
    with pytest.raises(DatasetError, match="'spaceship' is not a cifar-fs class"):
        CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))


def test_a_subset_is_refused_unless_asked_for(tmp_path, monkeypatch):
    fx.split_folder_layout(tmp_path, "cifar-fs", "cifar-fs", COUNTS, 2, (32, 32))
    monkeypatch.delenv(real.ALLOW_SUBSET_ENV, raising=False)
    with pytest.raises(DatasetError) as err:
        CifarFS(progress=False).load(data_root=str(tmp_path))
    msg = str(err.value)
    assert "standard split has {'train': 64, 'val': 16, 'test': 20}" in msg and real.ALLOW_SUBSET_ENV in msg
    assert "dfml-bench data check cifar-fs" in msg
    monkeypatch.setenv(real.ALLOW_SUBSET_ENV, "1")
    assert CifarFS(progress=False).load(data_root=str(tmp_path)).images.shape[0] == 28


def test_mini_imagenet_ravi_csv_layout(tmp_path):
    fx.mini_ravi_layout(tmp_path, COUNTS, 3, size=84)
    ds = MiniImageNet(allow_subset=True, progress=False).load(data_root=str(tmp_path))
    assert ds.images.shape == (42, 3, 84, 84) and ds.meta["layout"] == "split-csv"
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    assert {s: sorted(v) for s, v in _split_names(ds).items()} == fx.pick_classes("mini-imagenet", COUNTS)


def test_mini_imagenet_csv_disagreeing_with_ravi_split_is_an_error(tmp_path):
    base = fx.mini_ravi_layout(tmp_path, COUNTS, 2)
    val_rows = (base / "val.csv").read_text().splitlines()
    (base / "train.csv").write_text((base / "train.csv").read_text() + "\n".join(val_rows[1:3]) + "\n")
    (base / "val.csv").write_text("\n".join([val_rows[0]] + val_rows[3:]) + "\n")
    with pytest.raises(DatasetError, match="standard split puts it in meta-val"):
        MiniImageNet(allow_subset=True, progress=False).load(data_root=str(tmp_path))


def test_cub_distributed_layout_resized_to_84_by_class_index_rule(tmp_path):
    fx.cub_distributed(tmp_path, COUNTS, 2, size=(100, 120))
    ds = CUB(allow_subset=True, progress=False).load(data_root=str(tmp_path))
    assert ds.image_shape == (3, 84, 84) and ds.meta["layout"] == "class-folders"
    names = _split_names(ds)
    assert names["train"][:2] == ["001.Black_footed_Albatross", "003.Sooty_Albatross"]
    assert names["val"][0] == "002.Laysan_Albatross" and names["test"][0] == "004.Groove_billed_Ani"


def test_resize_is_antialiased_and_keeps_a_flat_colour(tmp_path):
    img = torch.tensor([200, 30, 90], dtype=torch.uint8)[:, None, None].expand(3, 300, 250).contiguous()
    fx.write_image(tmp_path / "flat.png", img)
    out = real.decode_one(tmp_path / "flat.png", 84)
    assert out.shape == (3, 84, 84) and torch.equal(out, img[:, :84, :84])


def test_decoded_images_are_cached_and_the_cache_follows_the_files(tmp_path, monkeypatch):
    base = fx.split_folder_layout(tmp_path, "cifar-fs", "cifar-fs", COUNTS, 2, (32, 32))
    first = CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))
    assert Path(first.meta["cache"]).exists()

    def no_decode(*a, **k):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(real, "decode_all", no_decode)
    again = CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))
    assert again.hash == first.hash and torch.equal(again.images, first.images)
    f = sorted((base / "meta_train").rglob("*.png"))[0]
    fx.write_image(f, torch.zeros(3, 32, 32, dtype=torch.uint8))  # content and mtime change
    with pytest.raises(AssertionError, match="decoded again"):
        CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))


def test_missing_dataset_error_names_path_layout_and_prepare_command(tmp_path, monkeypatch):
    with pytest.raises(DatasetError) as err:
        CifarFS(progress=False).load(data_root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "meta_train,meta_val,meta_test" in msg
    assert f"dfml-bench data prepare cifar-fs --from PATH --data-root {tmp_path}" in msg
    assert "cifar-100-python.tar.gz" in msg
    monkeypatch.delenv("DFML_BENCH_DATA", raising=False)
    with pytest.raises(DatasetError, match=r"no data root given\. Pass --data-root"):
        CUB(progress=False).load()


def test_unreadable_image_stops_the_load_naming_the_file(tmp_path):
    base = fx.split_folder_layout(tmp_path, "cifar-fs", "cifar-fs", COUNTS, 2, (32, 32))
    bad = sorted((base / "meta_val").rglob("*.png"))[0]
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=rf"unreadable image {bad}"):
        CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path))


# ------------------------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("as_archive", [True, False])
def test_prepare_cifar_fs_from_the_python_release(tmp_path, as_archive):
    src = fx.cifar100_python(tmp_path / "src", COUNTS, n_train=3, n_test=2, as_archive=as_archive)
    out = prep.prepare("cifar-fs", src, tmp_path / "root", progress=False)
    assert out == tmp_path / "root" / "cifar-fs" and (out / real.PREPARED_MARKER).exists()
    extra = standard_split("cifar-fs")["splits"]["train"][6]  # not among the picks: placed by the standard split
    assert len(list((out / "meta_train" / extra).glob("*.png"))) == 5
    ds = CifarFS(allow_subset=True, progress=False).load(data_root=str(tmp_path / "root"))
    assert ds.images.shape == (15 * 5, 3, 32, 32)
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 7, "val": 3, "test": 5}


def test_prepared_pixels_equal_the_pickled_pixels(tmp_path):
    src = fx.cifar100_python(tmp_path / "src", {"train": 1, "val": 1, "test": 1}, n_train=2, n_test=1, extra_classes=0)
    prep.prepare("cifar-fs", src, tmp_path / "root", progress=False)
    parts = prep._cifar_parts(src)
    data = torch.from_numpy(parts["train"]["data"].reshape(-1, 3, 32, 32))
    files = [f.decode() for f in parts["train"]["filenames"]]
    names = [n.decode() for n in parts["meta"]["fine_label_names"]]
    for i, lab in enumerate(parts["train"]["fine_labels"]):
        cls = names[lab]
        split = real.split_of_key("cifar-fs")[cls]
        png = tmp_path / "root" / "cifar-fs" / prep.SPLIT_DIRS[split] / cls / f"train-{files[i][:-4]}.png"
        assert torch.equal(decode_image(str(png)), data[i])


def test_prepare_is_idempotent(tmp_path):
    src = fx.cifar100_python(tmp_path / "src", COUNTS, n_train=2, n_test=1)
    out = prep.prepare("cifar-fs", src, tmp_path / "root", progress=False)
    stamp = (out / real.PREPARED_MARKER).stat().st_mtime_ns
    logs = []
    prep.prepare("cifar-fs", src, tmp_path / "root", progress=False, log=logs.append)
    assert (out / real.PREPARED_MARKER).stat().st_mtime_ns == stamp and "already prepared" in logs[-1]


def test_interrupted_prepare_is_never_taken_as_ready(tmp_path, monkeypatch):
    src = fx.cifar100_python(tmp_path / "src", COUNTS, n_train=2, n_test=1)
    root = tmp_path / "root"
    real_write = prep._write_items

    def dies_midway(tmp, items, progress, desc):
        real_write(tmp, items[: len(items) // 2], progress, desc)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_items", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("cifar-fs", src, root, progress=False)
    assert not (root / "cifar-fs").exists() and not list(root.glob(".cifar-fs.partial-*"))
    # a hard kill leaves the partial folder: the loader does not see it, the next prepare removes it
    partial = root / ".cifar-fs.partial-deadbeef" / "meta_train" / "apple"
    partial.mkdir(parents=True)
    fx.write_image(partial / "x.png", fx.class_images(1, 32, 32, 0)[0])
    with pytest.raises(DatasetError, match="no dataset found"):
        CifarFS(allow_subset=True, progress=False).load(data_root=str(root))
    monkeypatch.setattr(prep, "_write_items", real_write)
    out = prep.prepare("cifar-fs", src, root, progress=False)
    assert (out / real.PREPARED_MARKER).exists() and not list(root.glob(".cifar-fs.partial-*"))
    assert CifarFS(allow_subset=True, progress=False).load(data_root=str(root)).images.shape[0] == 15 * 3


def test_prepare_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    src = fx.cifar100_python(tmp_path / "src", COUNTS, n_train=2, n_test=1)
    (tmp_path / "root" / "cifar-fs").mkdir(parents=True)
    with pytest.raises(DatasetError, match="was not made by `data prepare`"):
        prep.prepare("cifar-fs", src, tmp_path / "root", progress=False)


def test_prepare_cub_from_the_tgz(tmp_path):
    tgz = fx.cub_tgz(tmp_path / "CUB_200_2011.tgz", COUNTS, 2)
    out = prep.prepare("cub", tgz, tmp_path / "root", progress=False)
    assert sorted(p.name for p in (out / "meta_val").iterdir()) == ["002.Laysan_Albatross", "006.Least_Auklet",
                                                                     "010.Red_winged_Blackbird"]
    ds = CUB(allow_subset=True, progress=False).load(data_root=str(tmp_path / "root"))
    assert ds.image_shape == (3, 84, 84) and len(ds.labels) == 28


def test_prepare_mini_from_images_and_csvs(tmp_path):
    src = fx.mini_ravi_layout(tmp_path / "src", COUNTS, 2, size=100)
    out = prep.prepare("mini-imagenet", src, tmp_path / "root", progress=False)
    wnid = fx.pick_classes("mini-imagenet", COUNTS)["test"][0]
    assert len(list((out / "meta_test" / wnid).iterdir())) == 2
    ds = MiniImageNet(allow_subset=True, progress=False).load(data_root=str(tmp_path / "root"))
    assert ds.image_shape == (3, 84, 84) and ds.meta["layout"] == "split-folders"


def test_prepare_rejects_a_non_archive(tmp_path):
    junk = tmp_path / "cifar-100-python.tar.gz"
    junk.write_bytes(b"nope")
    with pytest.raises(DatasetError, match="not a readable tar archive"):
        prep.prepare("cifar-fs", junk, tmp_path / "root", progress=False)
    assert not (tmp_path / "root" / "cifar-fs").exists()


# --------------------------------------------------------------------------------------------- check


def test_check_reports_what_is_wrong(tmp_path):
    base = fx.split_folder_layout(tmp_path, "cifar-fs", "cifar-fs", COUNTS, 3, (32, 32))
    fx.write_image(base / "meta_val" / fx.pick_classes("cifar-fs", COUNTS)["val"][0] / "odd.png", fx.class_images(1, 28, 28, 1)[0])
    (sorted((base / "meta_test").rglob("*.png"))[0]).write_bytes(b"broken")
    rep = prep.check("cifar-fs", tmp_path, progress=False)
    text = rep.format()
    assert not rep.ok
    assert rep.classes == {"train": 6, "val": 3, "test": 5} and "train 6/64" in text
    assert "meta-train has 6 of the standard 64 classes" in text
    assert "14 classes do not have the 600 images per class" in text and "val 3-4" in text
    assert "unreadable image" in text and "28x28" in text


def test_check_passes_a_complete_dataset(tmp_path):
    # a complete CUB-like class set with the literature's counts, tiny images (counts are what check verifies)
    img = bytes(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy())
    for n in range(1, 201):
        d = tmp_path / "cub" / prep.SPLIT_DIRS[real.split_of_key("cub")[n]] / fx.cub_folder(n)
        d.mkdir(parents=True)
        for i in range(41):
            (d / f"{i}.jpg").write_bytes(img)
    rep = prep.check("cub", tmp_path, decode=False, progress=False)  # counts only: decoding 8200 files is slow
    assert rep.ok, rep.format()
    assert rep.classes == {"train": 100, "val": 50, "test": 50} and rep.images_per_class["val"] == (41, 41)
    assert rep.format().endswith("OK")


def test_cli_check_and_prepare(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "check", "cifar-fs", "--data-root", str(tmp_path), "--quiet"])
    assert res.exit_code == 1 and "no dataset found" in res.output and "dfml-bench data prepare cifar-fs" in res.output
    src = fx.cifar100_python(tmp_path / "src", COUNTS, n_train=2, n_test=1)
    res = runner.invoke(cli, ["data", "prepare", "cifar-fs", "--from", str(src), "--data-root", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ready at" in res.output
    res = runner.invoke(cli, ["data", "check", "cifar-fs", "--data-root", str(tmp_path), "--quiet"])
    assert res.exit_code == 1 and "train 7/64" in res.output


# ------------------------------------------------------------------------------- paper-scale suites


def test_paper_zoo_specs_follow_the_reference_protocol():
    from dfml_bench.suites.common import paper_recipe, paper_zoo

    z = paper_zoo("cifar-fs")
    assert z.n_models == 100 and z.ways == 5 and z.backbones[0].arch == "conv4" and z.backbones[0].width == 32
    r = z.recipe_for("conv4")
    assert (r.optimizer, r.lr, r.epochs, r.batch_size, r.holdout, r.augment) == ("adam", 0.01, 60, 128, 0.2, "none")
    mixed = paper_zoo("mini-imagenet", ("conv4", "resnet10", "resnet18"))
    assert mixed.n_models == 300 and [mixed.backbone_for(i).arch for i in range(3)] == ["conv4", "resnet10", "resnet18"]
    rn = mixed.recipe_for("resnet18")
    assert (rn.optimizer, rn.lr, rn.momentum, rn.weight_decay, rn.milestones, rn.gamma) == ("sgd", 0.01, 0.9, 5e-4, (30, 50, 80), 0.2)
    assert paper_recipe("conv4", "cub").epochs == 100 and paper_recipe("resnet10", "cub").epochs == 100
    assert paper_zoo("multidomain").n_models == 300  # 100 per (domain, architecture)


def _smoke_fixture(root: Path) -> None:
    fx.split_folder_layout(root, "cifar-fs", "cifar-fs", {"train": 8, "val": 5, "test": 5}, 20, (32, 32))


def test_a_run_on_missing_data_stops_before_any_work(tmp_path):
    res = CliRunner().invoke(cli, ["run", "--suite", "smoke", "--scale", "paper", "--data-root", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "res"), "--quiet"])
    assert res.exit_code != 0 and "cifar-fs: no dataset found under data root" in res.output
    assert "dfml-bench data prepare cifar-fs" in res.output
    assert not list((tmp_path / "res").rglob("seed-*.json")) and not list(Path(os.environ["DFML_BENCH_HOME"]).glob("zoos/cifar-fs-*/*.pt"))


def test_paper_smoke_on_a_cifar_fs_fixture(tmp_path, monkeypatch):
    """The paper smoke suite's white-box scenario on a CIFAR-FS fixture, shrunk (2 models, 1 epoch, 3
    episodes) to stay fast; the full suite through the CLI is the slow test below."""
    from dataclasses import replace

    from dfml_bench.runner import RunOptions, run_suite
    from dfml_bench.scenarios import Suite, get_suite

    _smoke_fixture(tmp_path)
    monkeypatch.setenv(real.ALLOW_SUBSET_ENV, "1")
    paper = get_suite("smoke", "paper")
    assert {s.dataset for s in paper.scenarios} == {"cifar-fs"} and paper.scenarios[0].zoo.recipe_for("conv4").lr == 0.01
    sc = paper.scenarios[0]
    recipe = replace(sc.zoo.recipe_for("conv4"), epochs=1)
    sc = replace(sc, zoo=replace(sc.zoo, n_models=2, recipes=(("*", recipe),)), val_episodes=3)
    suite = Suite(name="smoke-mini", scale="paper", scenarios=[sc], methods=["random"])
    (rec,) = run_suite(suite, None, None, RunOptions(out=tmp_path / "res", episodes=3, data_root=str(tmp_path), progress=False))
    assert rec.status == "ok", rec.error
    assert len(rec.per_episode) == 3 and rec.hashes["dataset"] == load_cifar(tmp_path).hash


def load_cifar(root: Path):
    return CifarFS(allow_subset=True, progress=False).load(data_root=str(root))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mini-imagenet", "cub"])
def test_paper_smoke_scenarios_on_84px_fixtures(tmp_path, monkeypatch, dataset):
    """The paper smoke scenarios with the dataset swapped for an 84x84 one (Mini from CSVs, CUB as distributed)."""
    from dataclasses import replace

    from dfml_bench.runner import RunOptions, run_suite
    from dfml_bench.scenarios import Suite, get_suite

    counts = {"train": 6, "val": 5, "test": 5}
    if dataset == "mini-imagenet":
        fx.mini_ravi_layout(tmp_path, counts, 17, size=84)
    else:
        fx.cub_distributed(tmp_path, counts, 17, size=(90, 110))
    monkeypatch.setenv(real.ALLOW_SUBSET_ENV, "1")
    base = get_suite("smoke", "paper")
    scen = [replace(s, name=s.name.replace("cifarfs", dataset), dataset=dataset, zoo=replace(s.zoo, dataset=dataset, n_models=2))
            for s in base.scenarios]
    suite = Suite(name="smoke-84", scale="paper", scenarios=scen, methods=["random", "average"])
    recs = run_suite(suite, None, None, RunOptions(out=tmp_path / "res", episodes=3, data_root=str(tmp_path), progress=False))
    # wb/random, wb/average, bb/random ok; average needs white-box access, so it is skipped on the black-box scenario
    assert [r.status for r in recs] == ["ok", "ok", "ok", "skipped"], [r.error for r in recs]


@pytest.mark.slow
def test_cli_paper_smoke_end_to_end_on_fixtures(tmp_path, monkeypatch):
    """The exact command of the issue: `dfml-bench run --suite smoke --scale paper --data-root FIXTURES --episodes 20`."""
    _smoke_fixture(tmp_path)
    monkeypatch.setenv(real.ALLOW_SUBSET_ENV, "1")
    res = CliRunner().invoke(cli, ["run", "--suite", "smoke", "--scale", "paper", "--data-root", str(tmp_path), "--episodes", "20",
                                   "--out", str(tmp_path / "res"), "--quiet"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("seed-0.json")]
    assert sorted(r["status"] for r in recs) == ["ok"] * 5 + ["skipped"]  # average is white-box only
    assert all(len(r["per_episode"]) == 20 for r in recs if r["status"] == "ok")

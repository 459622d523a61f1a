"""The colour built-ins (clipart, its transfer halves, colour-mix) and the Fashion-MNIST transfer halves.

Most tests build on a small fake openclipart tree in tmp_path; one reads the real Debian package.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from mpp.data import builtin as builtin_data
from mpp.data import clipart as clipart_module
from mpp.data.builtin import (
    CLIPART_DOWNSTREAM,
    CLIPART_UPSTREAM,
    FASHION_MNIST_DIR,
    clipart,
    colour_mix,
    fashion_mnist_downstream,
    fashion_mnist_upstream,
)
from mpp.data.clipart import (
    CLIPART_CLASSES,
    OPENCLIPART_DIR,
    SPLIT_FRACTIONS,
    group_splits,
    is_placeholder,
    load_clipart,
    to_square,
)
from mpp.data.near_duplicates import connected_groups, name_stem
from mpp.data.sources import load_images
from mpp.errors import UsageError

FAKE_CLASSES = ["animals/birds", "food/fruit"]
REAL_CACHE = os.environ.get("MPP_CACHE")
# per class of CLIPART_CLASSES, from Debian openclipart-png 1:0.18+dfsg-19: a change here means the
# decoding, the cleaning, the grouping or the split changed
REAL_SPLIT_SIZES = {
    "train": [33, 33, 79, 33, 38, 37, 41, 60, 42, 32, 50, 40, 49, 37],
    "validation": [7, 9, 15, 3, 8, 8, 16, 12, 9, 7, 11, 8, 11, 8],
    "test": [7, 7, 21, 2, 8, 8, 10, 12, 9, 7, 11, 8, 10, 8],
}
# near-duplicates of the package that a split by file put on both sides of a split
REAL_SAME_DRAWINGS = [
    ("food/fruit/pear_simple_bw.png", "food/fruit/pear_simple.png"),
    ("food/fruit/lemon_simple_bw.png", "food/fruit/lemon_simple.png"),
    ("food/fruit/peach_simple_bw.png", "food/fruit/peach_simple.png"),
    ("food/fruit/watermelon_simple_bw.png", "food/fruit/watermelon_simple.png"),
    ("recreation/music/trumpet_b_flat__ganson.png", "recreation/music/trumpet_b_flat_colour_ganso.png"),
    ("transportation/vehicles/bus2_bw_jarno_vasamaa_01.png", "transportation/vehicles/bus2_jarno_vasamaa_01.png"),
    ("people/clothing/t-shirt_03.png", "people/clothing/t-shirt_02.png"),
    ("animals/bugs/bee1_mimooh_01.png", "animals/bugs/bee2_mimooh_01.png"),
    ("food/fruit/rondelle_orange_01.png", "food/fruit/rondelle_d_orange_01.png"),
    ("transportation/vehicles/hummer_01.png", "transportation/vehicles/hummers/hummer_01.png"),
    ("transportation/vehicles/hummer_05.png", "transportation/vehicles/hummers/hummer_05.png"),
    ("transportation/vehicles/hummer_07.png", "transportation/vehicles/hummers/hummer_07.png"),
]
REAL_DROPPED = {
    "placeholder": 17,
    "blank": 125,
    "too large": 3,
    "unreadable": 0,
    "duplicate (full_resolution)": 1171,
    "duplicate (resized)": 1,
}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(clipart_module, "_decoded", {})


def placeholder(w: int, h: int) -> Image.Image:
    """Inkscape's "Linked Image Not Found" drawing, stretched to w x h: red frame, red square with a
    white X in the upper middle, black text (here bars) in the lower half, on transparency."""
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, w - 1, h - 1], fill=(255, 255, 255, 255), outline=(255, 0, 0, 255), width=max(2, w // 50))
    d.rectangle([0.35 * w, 0.1 * h, 0.65 * w, 0.4 * h], fill=(255, 0, 0, 255))
    d.line([0.42 * w, 0.17 * h, 0.58 * w, 0.33 * h], fill=(255, 255, 255, 255), width=max(2, w // 30))
    d.line([0.42 * w, 0.33 * h, 0.58 * w, 0.17 * h], fill=(255, 255, 255, 255), width=max(2, w // 30))
    for top in (0.5, 0.65, 0.8):
        d.rectangle([0.12 * w, top * h, 0.88 * w, (top + 0.1) * h], fill=(0, 0, 0, 255))
    return im


def drawing(seed: int) -> Image.Image:
    """A distinct clip-art-like RGBA image: coloured shapes on transparency, some half transparent."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(40, 120, 2))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (int(rng.choice([128, 255])),)
        d.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=colour)
    return im


def name(i: int) -> str:
    """A distinct file-name stem per index (letters: stems ignore digits)."""
    return "img_" + chr(97 + i // 26) + chr(97 + i % 26)


def fake_openclipart(root: Path, per_class: int = 30) -> dict:
    """A tree shaped like /usr/share/openclipart/png: two class folders (one with a sub-folder), a
    folder outside the classes, plus one placeholder, one blank image and duplicates. Returns what it planted."""
    seed = 0
    for folder in [*FAKE_CLASSES, "shapes/stars"]:
        for i in range(per_class if folder in FAKE_CLASSES else 10):
            sub = "sub/" if folder == "animals/birds" and i % 3 == 0 else ""
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
            drawing(seed).save(root / folder / f"{sub}{name(seed)}.png")
            seed += 1
    placeholder(120, 90).save(root / "food/fruit/missing_link.png")
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(root / "food/fruit/blank.png")
    # same pixels as a class image, different file bytes, outside the classes: the class copy stays
    (root / "abstract").mkdir()  # sorts before animals/: the kept copy must still be the class's
    drawing(0).save(root / "abstract/copy_of_bird.png", compress_level=0)
    drawing(30).convert("RGBA").save(root / "food/fruit/twin.png", compress_level=1)  # same pixels as food/fruit/img_be
    return {"placeholders": 1, "blank": 1, "duplicates": 2}


def test_transparency_is_composited_onto_white_by_value():
    half_red = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    # by hand: a*255 + (1-a)*255 = 255 for red, (1 - 128/255) * 255 = 127 for green and blue
    assert (to_square(half_red) == [255, 127, 127]).all()
    blue_and_clear = Image.new("RGBA", (2, 2), (0, 255, 0, 0))  # hidden green must not show
    blue_and_clear.paste((0, 0, 255, 255), (0, 0, 1, 2))
    out = to_square(blue_and_clear)  # (64, 64, 3)
    assert (out[:, :32] == [0, 0, 255]).all() and (out[:, 32:] == [255, 255, 255]).all()


def test_wide_image_is_padded_to_a_square_with_the_background():
    out = to_square(Image.new("RGBA", (40, 20), (0, 0, 0, 255)))  # 2:1, opaque black
    assert out.shape == (64, 64, 3)
    assert (out[16:48] == 0).all() and (out[:16] == 255).all() and (out[48:] == 255).all()


def test_placeholder_detected_at_any_stretch_and_red_artwork_kept():
    for w, h in [(120, 90), (300, 400), (480, 480)]:
        assert is_placeholder(np.asarray(placeholder(w, h)))
    swiss = Image.new("RGBA", (200, 200), (255, 0, 0, 255))
    ImageDraw.Draw(swiss).rectangle([85, 40, 115, 160], fill=(255, 255, 255, 255))
    japan = Image.new("RGBA", (300, 200), (255, 255, 255, 255))
    ImageDraw.Draw(japan).ellipse([90, 40, 210, 160], fill=(255, 0, 0, 255))
    assert not is_placeholder(np.asarray(swiss)) and not is_placeholder(np.asarray(japan))
    assert not is_placeholder(np.asarray(drawing(3)))


def test_clipart_drops_placeholders_blanks_and_duplicates(tmp_path, capsys):
    planted = fake_openclipart(tmp_path / "png")
    data = load_clipart(tmp_path / "png", FAKE_CLASSES)
    said = capsys.readouterr().err.splitlines()  # the slow first decoding says what it does, once
    assert (
        len(said) == 2
        and said[0].startswith("clip art: decoding ")
        and "once into" in said[0]
        and said[1].endswith("cached")
    )
    clipart_module._decoded.clear()
    load_clipart(tmp_path / "png", FAKE_CLASSES)
    assert capsys.readouterr().err == ""  # from the cache: quiet
    paths = set(data["paths"].tolist())
    assert "food/fruit/missing_link.png" not in paths and "food/fruit/blank.png" not in paths
    assert "animals/birds/sub/img_aa.png" in paths and "abstract/copy_of_bird.png" not in paths  # class copy kept
    assert "food/fruit/img_be.png" in paths and "food/fruit/twin.png" not in paths
    assert data["dropped"]["placeholder"] == planted["placeholders"] and data["dropped"]["blank"] == planted["blank"]
    assert (
        data["dropped"]["duplicate (full_resolution)"] + data["dropped"]["duplicate (resized)"] == planted["duplicates"]
    )
    assert len(paths) == 2 * 30 + 10  # every planted drawing, the non-class folder included
    flat = data["images"].reshape(len(paths), -1)
    assert len(np.unique(flat, axis=0)) == len(paths)


def test_clipart_splits_are_disjoint_and_deterministic(tmp_path):
    root = tmp_path / "png"
    fake_openclipart(root)
    splits = {s: clipart(s, root, FAKE_CLASSES) for s in ("train", "validation", "test")}
    assert splits["train"].features["label"].names == FAKE_CLASSES
    assert sum(len(d) for d in splits.values()) == 2 * 30  # not the twin, placeholder or blank
    images = {s: {d["image"].tobytes() for d in ds.with_format("numpy")} for s, ds in splits.items()}
    assert not (images["train"] & images["validation"]) and not (images["train"] & images["test"])
    assert not (images["validation"] & images["test"])
    for ds in splits.values():  # every class in every split: groups are dealt class by class
        assert set(np.asarray(ds["label"])) == {0, 1}
    clipart_module._decoded.clear()
    clipart_module._grouped.clear()
    assert (
        len(list((tmp_path / "cache").glob("clipart-v*.npz"))) == 1
        and len(list((tmp_path / "cache").glob("clipart-groups-*.npy"))) == 1
    )
    again = clipart("train", root, FAKE_CLASSES)  # from the cache files this time
    assert list(map(bytes, again.with_format("numpy")[:]["image"])) == list(
        map(bytes, splits["train"].with_format("numpy")[:]["image"])
    )


def test_groups_are_dealt_whole_and_each_class_keeps_its_shares():
    """Hand-made groups: a group never spans two splits, and each class gets its 70/15/15 within the
    size of its largest group, however the groups' sizes differ."""
    rng = np.random.default_rng(0)
    paths, groups = [], []
    for cls in ("animals/birds", "food/fruit", "shapes/stars"):
        for g in range(60):
            first = len(paths)
            for k in range(int(rng.choice([1, 1, 1, 2, 3, 6]))):
                paths.append(f"{cls}/g{g:02d}_{k}.png")
                groups.append(first)
    splits = group_splits(paths, np.array(groups), CLIPART_CLASSES)
    for g in set(groups):
        assert len({splits[i] for i in range(len(paths)) if groups[i] == g}) == 1
    for cls in ("animals/birds", "food/fruit", "shapes/stars"):
        mine = np.array([p.startswith(cls) for p in paths])
        for split, share in SPLIT_FRACTIONS.items():
            assert abs((splits[mine] == split).sum() - share * mine.sum()) <= 6  # the largest group


def test_file_name_stems_and_connected_groups():
    assert name_stem("food/fruit/pear_simple_bw.png") == name_stem("food/fruit/pear_simple.png")
    assert name_stem("animals/bugs/bee1_mimooh_01.png") == name_stem("animals/bugs/bee2_mimooh_01.png")
    assert name_stem("recreation/music/trumpet_b_flat__ganson.png") == name_stem(
        "recreation/music/trumpet_b_flat_colour_ganso.png"
    )
    assert name_stem("food/fruit/rondelle_orange_01.png") == name_stem("food/fruit/rondelle_d_orange_01.png")
    assert name_stem("food/fruit/pear_simple.png") != name_stem("food/fruit/peach_simple.png")
    # links 0-3, 3-5 and 1-2 make {0, 3, 5}, {1, 2}, {4}; each group is named by its first member
    assert connected_groups(6, np.array([[3, 5], [0, 3], [2, 1]])).tolist() == [0, 1, 1, 0, 4, 0]


def recoloured(im: Image.Image) -> Image.Image:
    """Hue turned by a third of the circle, alpha kept."""
    rgba = im.convert("RGBA")
    h, s, v = rgba.convert("RGB").convert("HSV").split()
    out = Image.merge("HSV", (h.point(lambda x: (x + 85) % 256), s, v)).convert("RGBA")
    out.putalpha(rgba.getchannel("A"))
    return out


def black_and_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = ImageOps.grayscale(rgba.convert("RGB")).convert("RGBA")
    out.putalpha(rgba.getchannel("A"))
    return out


def rescaled(im: Image.Image) -> Image.Image:
    """A third of the size, on a page with wide uneven margins."""
    small = im.convert("RGBA").resize((max(1, im.width // 3), max(1, im.height // 3)), Image.LANCZOS)
    page = Image.new("RGBA", (small.width + 40, small.height + 10), (0, 0, 0, 0))
    page.paste(small, (30, 3))
    return page


# asymmetric drawings of the real package, from different classes (a mirrored copy must be found by mirroring)
ORIGINALS = [
    "recreation/music/trumpet_b_flat_colour_ganso.png",
    "transportation/vehicles/bus2_jarno_vasamaa_01.png",
    "computer/hardware/joystick_black_red_petri_01.png",
    "animals/bugs/bee1_mimooh_01.png",
    "food/fruit/pear_simple.png",
    "people/clothing/t-shirt_02.png",
    "buildings/homes/home3.png",
]
VARIANTS = {
    "recoloured": recoloured,
    "black-and-white": black_and_white,
    "mirrored": ImageOps.mirror,
    "rescaled": rescaled,
}
# the package's own line-art versions of coloured drawings (white fills, outlines kept): planted under other names
LINE_ART = {
    "food/fruit/pear_simple_bw.png": "food/fruit/pear_simple.png",
    "food/fruit/lemon_simple_bw.png": "food/fruit/lemon_simple.png",
    "food/fruit/peach_simple_bw.png": "food/fruit/peach_simple.png",
    "transportation/vehicles/bus2_bw_jarno_vasamaa_01.png": "transportation/vehicles/bus2_jarno_vasamaa_01.png",
}


@pytest.mark.skipif(not OPENCLIPART_DIR.exists(), reason="the real clip art needs 'apt-get install openclipart-png'")
def test_recoloured_black_and_white_mirrored_and_rescaled_copies_land_with_their_original(tmp_path):
    """Real drawings, each planted four times under unrelated names in other folders, plus the package's
    line-art versions of four drawings under unrelated names, among other real drawings: every copy is in
    its original's group and split, and the originals stay apart."""
    root = tmp_path / "png"
    others = sorted(p for c in CLIPART_CLASSES for p in (OPENCLIPART_DIR / c).glob("*.png"))[::25]
    originals = ORIGINALS + [o for o in LINE_ART.values() if o not in ORIGINALS]
    for path in others + [OPENCLIPART_DIR / o for o in originals]:
        relative = path.relative_to(OPENCLIPART_DIR)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(path.read_bytes())
    planted = {}
    for i, original in enumerate(ORIGINALS):
        with Image.open(OPENCLIPART_DIR / original) as im:
            for j, (kind, make) in enumerate(VARIANTS.items()):
                folder = CLIPART_CLASSES[(i + j + 3) % len(CLIPART_CLASSES)]  # another class's folder
                copy = f"{folder}/planted_{name(10 * i + j)}.png"
                (root / copy).parent.mkdir(parents=True, exist_ok=True)
                make(im.convert("RGBA")).save(root / copy)
                planted[copy] = (original, kind)
    for k, (line_art, original) in enumerate(LINE_ART.items()):
        copy = f"animals/birds/planted_{name(100 + k)}.png"
        (root / copy).write_bytes((OPENCLIPART_DIR / line_art).read_bytes())
        planted[copy] = (original, "line art")
    data = load_clipart(root)
    index = {p: k for k, p in enumerate(data["paths"].tolist())}
    groups, splits = data["groups"], data["splits"]
    missed = [
        (copy, kind) for copy, (original, kind) in planted.items() if groups[index[copy]] != groups[index[original]]
    ]
    assert not missed
    assert all(splits[index[copy]] == splits[index[original]] for copy, (original, _) in planted.items())
    assert len({groups[index[o]] for o in originals}) == len(originals)
    assert len(set(groups.tolist())) >= len(others) // 2  # the other drawings are not lumped together


def test_missing_package_is_a_one_line_usage_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-png"):
        clipart("train", tmp_path / "nothing")
    monkeypatch.setattr(builtin_data, "OPENCLIPART_DIR", tmp_path / "nothing")
    monkeypatch.setitem(builtin_data.BUILTIN_DATASETS, "clipart", lambda split: clipart(split, tmp_path / "nothing"))
    with pytest.raises(UsageError) as e:
        load_images("clipart", "train")
    assert "apt-get install openclipart-png" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="'train', 'validation' and 'test'"):
        load_images("clipart", "val")


def test_colour_mix_is_unlabelled_and_keeps_held_out_clipart_out_of_train(tmp_path):
    root = tmp_path / "png"
    fake_openclipart(root)
    mix = colour_mix("train", root, photo_crops=5)
    assert list(mix.features) == ["image"] and mix.features["image"].shape == (64, 64, 3)
    held = {
        d["image"].tobytes()
        for s in ("validation", "test")
        for d in clipart(s, root, FAKE_CLASSES).with_format("numpy")
    }
    train = {bytes(a) for a in mix.with_format("numpy")[:]["image"]}
    assert held and not (held & train)
    n_train_art = int((load_clipart(root, FAKE_CLASSES)["splits"] == "train").sum())
    assert len(mix) == n_train_art + 5


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_transfer_halves():
    up_train, up_val, down_test = (
        fashion_mnist_upstream("train"),
        fashion_mnist_upstream("validation"),
        fashion_mnist_downstream("test"),
    )
    assert (len(up_train), len(up_val), len(down_test)) == (27000, 3000, 5000)  # 10% per class held out of train
    assert up_train.features["label"].names == ["t-shirt/top", "trouser", "pullover", "dress", "coat"]
    assert down_test.features["label"].names == ["sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert np.bincount(up_val["label"]).tolist() == [600] * 5 and np.bincount(down_test["label"]).tolist() == [1000] * 5
    val = np.asarray(up_val.with_format("numpy")[:]["image"])
    assert (np.asarray(fashion_mnist_upstream("validation").with_format("numpy")[:]["image"]) == val).all()  # fixed
    train = {a.tobytes() for a in np.asarray(up_train.with_format("numpy")[:]["image"])}
    assert sum(a.tobytes() in train for a in val) < 30  # held out (Fashion-MNIST has a few exact duplicates)
    # ([:] slices: reading an Array3D column whole, without [:], is ~300x slower in datasets 5.2)


@pytest.mark.skipif(not OPENCLIPART_DIR.exists(), reason="the real clip art needs 'apt-get install openclipart-png'")
def test_real_clipart_classes_split_sizes_and_drops(monkeypatch):
    """The real package: the decoded cache is shared with every other user (first build: minutes)."""
    if REAL_CACHE:
        monkeypatch.setenv("MPP_CACHE", REAL_CACHE)
    else:
        monkeypatch.delenv("MPP_CACHE")
    splits = {s: clipart(s) for s in ("train", "validation", "test")}
    assert splits["test"].features["label"].names == CLIPART_CLASSES
    sizes = {s: np.bincount(ds["label"], minlength=len(CLIPART_CLASSES)).tolist() for s, ds in splits.items()}
    assert sizes == REAL_SPLIT_SIZES
    assert not set(CLIPART_UPSTREAM) & set(CLIPART_DOWNSTREAM) and sorted(
        CLIPART_UPSTREAM + CLIPART_DOWNSTREAM
    ) == sorted(CLIPART_CLASSES)
    down = load_images("clipart-downstream", "train")
    assert down.features["label"].names == CLIPART_DOWNSTREAM and min(np.bincount(down["label"])) >= 10  # 10-shot draws
    assert len(load_images("clipart-upstream", "train")) + len(down) == len(splits["train"])
    data = load_clipart()
    assert data["dropped"] == REAL_DROPPED
    index = {p: k for k, p in enumerate(data["paths"].tolist())}
    for a, b in REAL_SAME_DRAWINGS:
        assert data["groups"][index[a]] == data["groups"][index[b]], (a, b)
    assert len(set(data["groups"].tolist())) == 3347  # of 6,804 kept images

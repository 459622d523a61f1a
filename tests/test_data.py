import gzip
import io
import random
import struct
import tarfile

import numpy as np
import pytest
import torch
from datasets import Array3D, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from mpp.data.builtin import FASHION_MNIST_DIR, mnist5k, photos, read_idx
from mpp.data.decode import BadImage, as_tensor, decode_image, open_image
from mpp.data.heldout import labelled_images
from mpp.data.images import AugmentedImages, collate_images, seeded
from mpp.data.sources import find_image_column, load_images
from mpp.data.transforms import train_transform
from mpp.errors import UsageError
from mpp.models.targets import Mean3Bit


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_mnist5k_builtin():
    ds = mnist5k()
    assert len(ds) == 5000 and find_image_column(ds) == "image"
    labels = np.array(ds["label"])
    assert (np.bincount(labels) == 500).all()
    image, problem = decode_image(ds.with_format("numpy")[0]["image"])
    assert problem == "" and image.shape == (3, 28, 28) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and image.max() > 200  # grey digit as RGB


def test_photos_builtin_covers_the_colour_classes():
    ds = photos()
    images = torch.stack([decode_image(v)[0] for v in ds.with_format("numpy")["image"]])
    classes = Mean3Bit().compute(images.float() / 255, 8).unique()
    assert images.shape == (4000, 3, 64, 64)
    assert len(classes) == 512  # every 3-bit colour occurs as some 8x8 patch's mean


def test_read_idx_against_hand_written_file(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + data.tobytes())
    assert np.array_equal(read_idx(path), data)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_builtin():
    ds = load_images("fashion-mnist", split="test")
    assert len(ds) == 10_000 and ds.features["label"].names[9] == "ankle boot"


def test_unknown_builtin_split_and_missing_path():
    with pytest.raises(UsageError, match="fashion-mnist"):
        load_images("fashion-mnist", split="validation")
    with pytest.raises(UsageError, match="no such file"):
        load_images("./does/not/exist")


def test_a_missing_folder_under_a_local_one_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    """'data/mine' with a local folder 'data' was meant as a path: refused at once, never sent to the Hub;
    'owner/name' with no such local folder goes to the Hub, whose failure says no local folder exists either."""
    import mpp.data.sources as dataset_module

    asked = []
    monkeypatch.setattr(
        dataset_module,
        "load_dataset",
        lambda path, **kw: asked.append(path) or (_ for _ in ()).throw(FileNotFoundError(path)),
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(UsageError, match=r"^--dataset data/mine: no such file or folder"):
        load_images("data/mine")
    assert asked == []
    with pytest.raises(
        UsageError,
        match=r"^--dataset owner/name: no local file or folder of that name, and the Hugging Face Hub could not",
    ):
        load_images("owner/name")
    assert asked == ["owner/name"]


def test_dataset_without_image_column():
    ds = Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(UsageError, match="no image column"):
        find_image_column(ds)
    with pytest.raises(UsageError, match="--image-column 'img' not in"):
        find_image_column(ds, "img")


@pytest.fixture()
def messy_folder(tmp_path):
    """An imagefolder with good images in many modes and files that are not images at all."""
    root = tmp_path / "images" / "cls"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    rgb.save(root / "rgb.jpg")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.convert("P").save(root / "palette.png")
    rgb.convert("L").save(root / "grey.png")
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(root / "sixteen.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "tiny.png")
    (root / "truncated.jpg").write_bytes(png_bytes(rgb, "JPEG")[:300])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    return tmp_path / "images"


def test_imagefolder_with_broken_files_is_counted_not_fatal(messy_folder):
    ds = load_images(str(messy_folder))
    column = find_image_column(ds)
    images = AugmentedImages(ds, column, train_transform(16), seed=0)
    batch = collate_images(images.__getitems__(list(range(len(images)))))
    names = sorted(name.rsplit("/", 1)[-1] for name, _ in batch["bad"])
    assert names == ["empty.png", "notes.jpg", "truncated.jpg"]
    assert batch["pixels"].shape == (10, 3, 16, 16) and batch["pixels"].dtype == torch.uint8  # bad slots refilled


def level(x):
    """The documented rounding of a scaled value: to the nearest level, halves up."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.uint8)


def rgb_of(value) -> np.ndarray:
    """decode_image(value) as an (H, W, 3) numpy array; fails with the reason when it is refused."""
    image, problem = decode_image(value)
    assert image is not None, problem
    return image.permute(1, 2, 0).numpy()


def stored(img: Image.Image, fmt="PNG") -> dict:
    return {"bytes": png_bytes(img, fmt), "path": None}


def test_arrays_decode_by_dtype_not_by_their_own_range():
    floats = np.array([[0.0, 0.2, 0.5, 1.0]], dtype=np.float32)  # [0, 1] -> x * 255
    assert np.array_equal(rgb_of(floats)[..., 0], level(floats * 255)) and rgb_of(floats)[0, 2, 0] == 128
    sixteen = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)  # 0..65535 -> x * 255 / 65535
    assert rgb_of(sixteen)[0, :, 1].tolist() == [0, 1, 128, 255]
    assert rgb_of(np.array([[False, True]]))[0, :, 2].tolist() == [0, 255]
    assert rgb_of(np.array([[7, 200]], dtype=np.int64))[0, :, 0].tolist() == [
        7,
        200,
    ]  # other integers: levels as they are
    dark = np.full((5, 5, 3), 0.1)  # a dark float image stays dark: no stretching to its own maximum
    assert (rgb_of(dark) == 26).all()


def test_channels_first_arrays_are_transposed_and_ambiguous_ones_refused():
    red = np.zeros((3, 8, 6), dtype=np.uint8)
    red[0] = 255  # (C, H, W)
    out = rgb_of(red)
    assert out.shape == (8, 6, 3) and (out == [255, 0, 0]).all()
    grey = np.arange(8 * 6, dtype=np.uint8).reshape(1, 8, 6)
    assert np.array_equal(rgb_of(grey), np.repeat(grey[0][..., None], 3, axis=2))
    rgba = np.zeros((2, 5, 4), dtype=np.uint8)
    rgba[0] = [255, 0, 0, 0]  # transparent: white
    rgba[1] = [0, 0, 255, 255]  # opaque blue
    assert (rgb_of(rgba)[0] == 255).all() and (rgb_of(rgba)[1] == [0, 0, 255]).all()
    for bad, reason in [
        (np.zeros((3, 4, 4), np.uint8), "ambiguous"),
        (np.zeros((2, 8, 8), np.uint8), "no channel axis"),
        (np.zeros((1, 5, 5, 3), np.uint8), "expected (H, W)"),
        (np.full((5, 5), 1.5), "[0, 1], found 1.5..1.5"),
        (np.full((5, 5), np.nan), "[0, 1], found nan"),
        (np.full((5, 5), 300), "0..255, found 300..300"),
    ]:
        image, problem = decode_image(bad)
        assert image is None and reason in problem, (bad.shape, problem)


def test_pil_modes_decode_by_value():
    over_white = Image.new("RGBA", (3, 2), (0, 0, 0, 128))  # half-transparent black over white: 255 - 128
    assert (abs(rgb_of(stored(over_white)).astype(int) - 127) <= 1).all()
    assert (rgb_of(stored(Image.new("RGBA", (3, 2), (255, 0, 0, 0)))) == 255).all()  # fully transparent: white
    assert (rgb_of(stored(Image.new("RGBA", (3, 2), (10, 20, 30, 255)))) == [10, 20, 30]).all()
    assert (rgb_of(stored(Image.new("LA", (3, 2), (50, 0)))) == 255).all() and (
        rgb_of(stored(Image.new("LA", (3, 2), (50, 255)))) == 50
    ).all()
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 transparent: white
    assert rgb_of(stored(palette)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # full cyan
    assert (rgb_of(stored(cmyk, "TIFF")) == [0, 255, 255]).all()
    sixteen = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))  # I;16
    assert rgb_of(stored(sixteen))[0, :, 0].tolist() == [0, 1, 128, 255]
    # mode I (32-bit integers): always 16-bit levels, whatever the image's own maximum
    assert rgb_of(stored(Image.fromarray(np.array([[255, 257, 65535]], dtype=np.int32)), "TIFF"))[0, :, 0].tolist() == [
        1,
        1,
        255,
    ]
    assert rgb_of(stored(Image.fromarray(np.full((2, 2), 200, dtype=np.int32)), "TIFF"))[0, 0, 0] == 1
    # mode F: floats in [0, 1]
    assert rgb_of(stored(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), "TIFF"))[0, :, 1].tolist() == [
        0,
        128,
        255,
    ]
    for refused in [
        Image.fromarray(np.array([[0.5, 1.5]], dtype=np.float32)),
        Image.fromarray(np.array([[-1, 5]], dtype=np.int32)),
        Image.fromarray(np.array([[70000, 5]], dtype=np.int32)),
    ]:
        image, problem = decode_image(stored(refused, "TIFF"))
        assert image is None and "must lie in" in problem, refused.mode


def test_decode_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: composited on white
    img, _ = decode_image({"bytes": png_bytes(rgba), "path": None})
    assert img.shape == (3, 4, 4) and (img == 255).all()
    exif = Image.new("RGB", (6, 2))
    ex = exif.getexif()
    ex[0x0112] = 6  # orientation: rotate 90 degrees
    img, _ = decode_image({"bytes": png_bytes(exif, "JPEG", exif=ex), "path": None})
    assert img.shape == (3, 6, 2)
    img, problem = decode_image({"bytes": b"", "path": None})
    assert img is None and problem


def test_encoded_images_are_augmented_as_pil_like_tensors():
    # encoded files are cropped and resized by PIL before becoming tensors (cheaper); with the same
    # seed the result must match augmenting the decoded tensor: same crop box, same flip
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((320, 240))  # smooth, not square
    stored = {"bytes": png_bytes(photo), "path": None}
    pil, _ = open_image(stored)
    assert isinstance(pil, Image.Image)
    tf = train_transform(24, crop_scale=(0.2, 0.5))
    for seed in range(5):
        via_pil = as_tensor(seeded(tf, pil, seed))
        via_tensor = seeded(tf, decode_image(stored)[0], seed)
        assert via_pil.shape == via_tensor.shape == (3, 24, 24) and via_pil.dtype == torch.uint8
        assert (
            via_pil.float() - via_tensor.float()
        ).abs().mean() < 1.0  # levels of 255: resampling filters differ slightly


def _write_image_table(tmp_path):
    imgs = [Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)) for i in range(6)]
    return Dataset.from_dict(
        {"img": imgs, "label": list(range(6))}, features=Features({"img": ImageFeature(), "label": Value("int64")})
    )


def test_save_to_disk_parquet_and_webdataset(tmp_path):
    ds = _write_image_table(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "table.parquet"))
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(6):
            data = png_bytes(Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)))
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for source in ["saved", "table.parquet", "shard-0.tar"]:
        loaded = load_images(str(tmp_path / source))
        column = find_image_column(loaded)
        assert len(loaded) == 6, source
        first, problem = decode_image(loaded.cast_column(column, ImageFeature(decode=False))[0][column])
        assert problem == "" and first.shape == (3, 8, 8), source


def test_streaming_local_parquet(tmp_path):
    _write_image_table(tmp_path).to_parquet(str(tmp_path / "table.parquet"))
    stream = load_images(str(tmp_path / "table.parquet"), streaming=True)
    assert find_image_column(stream) == "img"
    assert sum(1 for _ in stream) == 6


def noise_images(seed: int = 3) -> AugmentedImages:
    """32 images of random noise (any two different crops differ), augmented with this run seed."""
    rng = np.random.default_rng(0)
    ds = Dataset.from_dict(
        {"image": list(rng.integers(0, 256, (32, 28, 28, 3), dtype=np.uint8))},
        features=Features({"image": Array3D((28, 28, 3), "uint8")}),
    )
    return AugmentedImages(ds, "image", train_transform(28), seed=seed)


def test_augmentation_depends_only_on_seed_epoch_and_batch():
    """A batch's augmentation is seeded by (seed, epoch, its first index): image 4 first in two
    different batches gets the same crop, a second copy of it in the same batch another one, and
    another epoch or seed another one; the global RNGs neither matter nor change."""
    a, b = noise_images(), noise_images()
    torch.manual_seed(123)  # the global RNG plays no part
    first = a.__getitems__([4, 5, 9])
    torch.manual_seed(456)
    assert torch.equal(b.__getitems__([4, 7, 8])[0], first[0])
    twice = a.__getitems__([4, 4])
    assert torch.equal(twice[0], first[0]) and not torch.equal(twice[1], twice[0])
    assert not torch.equal(noise_images(seed=4).__getitems__([4, 5, 9])[0], first[0])
    a.set_epoch(1)
    assert not torch.equal(a.__getitems__([4, 5, 9])[0], first[0])
    rng_before, py_before = torch.get_rng_state(), random.getstate()
    b.__getitems__([7, 8])
    assert torch.equal(torch.get_rng_state(), rng_before) and random.getstate() == py_before  # nor is it disturbed


def test_augmentation_does_not_depend_on_the_number_of_workers():
    """The same batches through a DataLoader with 0 and with 2 worker processes: identical pixels."""
    batches = [[4, 5, 9], [0, 1], [30, 2, 17, 8], [11, 12]]  # a fixed batch sampler

    def load(workers):
        images = noise_images()
        images.set_epoch(2)
        loader = torch.utils.data.DataLoader(
            images, batch_sampler=batches, collate_fn=collate_images, num_workers=workers
        )
        return [batch["pixels"] for batch in loader]

    in_process, two_workers = load(0), load(2)
    assert len(two_workers) == 4 and all(torch.equal(x, y) for x, y in zip(in_process, two_workers))


def test_collate_keeps_the_batch_shape_and_names_bad_items():
    good = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    batch = collate_images([good[0], BadImage("x.jpg", "broken"), good[1], good[2]])
    assert batch["pixels"].shape == (4, 3, 4, 4) and batch["bad"] == [("x.jpg", "broken")]
    assert torch.equal(batch["pixels"][:3], torch.stack(good)) and torch.equal(batch["pixels"][3], good[0])
    assert batch["valid"].tolist() == [True, True, True, False]  # the filled slot is marked
    labelled = collate_images([(good[0], 7), BadImage("x.jpg", "broken"), (good[1], 8)])
    assert labelled["labels"].tolist() == [7, 8, 7] and labelled["valid"].tolist() == [True, True, False]
    with pytest.raises(RuntimeError, match="all 1 images of a batch are unreadable, e.g. y.png"):
        collate_images([BadImage("y.png", "empty")])


def test_missing_label_is_a_bad_item():
    ds = Dataset.from_dict(
        {"image": [np.zeros((5, 5, 3), dtype=np.uint8)] * 2, "label": [3, None]},
        features=Features({"image": Array3D((5, 5, 3), "uint8"), "label": Value("int64")}),
    )
    items = AugmentedImages(ds, "image", lambda x: x, seed=0, label_column="label").__getitems__([0, 1])
    assert items[0][1] == 3 and isinstance(items[1], BadImage) and items[1].reason == "missing label"


def test_limited_eval_subset_is_stratified_and_seeded(tmp_path):
    """A folder stored class by class (4 x 50): `limit` 60 must not be the first 60 rows (classes 0 and 1 only)."""
    from datasets import ClassLabel

    labels = np.repeat(np.arange(4), 50)
    images = np.zeros((200, 8, 8, 1), dtype=np.uint8)
    images[:, 0, :, 0] = (labels * 60)[:, None]  # top row: the class
    images[:, 1, :, 0] = (np.arange(200) % 50)[:, None]  # second row: the example within its class
    ds = Dataset.from_dict(
        {"image": images, "label": labels},
        features=Features({"image": Array3D((8, 8, 1), "uint8"), "label": ClassLabel(names=list("abcd"))}),
    )
    ds.save_to_disk(str(tmp_path / "sorted"))
    x, y = labelled_images(str(tmp_path / "sorted"), "train", 8, limit=60)
    assert np.bincount(y.numpy(), minlength=4).tolist() == [15, 15, 15, 15]
    assert torch.equal(x[:, 0, 0, 0], (y * 60).to(torch.uint8))  # each image still carries its own label
    picked = set(zip(y.tolist(), x[:, 0, 1, 0].tolist()))
    assert len(picked) == 60 and {i for _, i in picked} != set(
        range(15)
    )  # drawn at random, not each class's first rows
    _, y62 = labelled_images(str(tmp_path / "sorted"), "train", 8, limit=62)
    assert sorted(np.bincount(y62.numpy(), minlength=4).tolist()) == [15, 15, 16, 16]
    again, _ = labelled_images(str(tmp_path / "sorted"), "train", 8, limit=60, seed=0)
    other, _ = labelled_images(str(tmp_path / "sorted"), "train", 8, limit=60, seed=1)
    assert torch.equal(again, x) and not torch.equal(other, x)  # seeded


def test_shards_named_by_split_load_one_split_each(tmp_path):
    """A folder of `<split>-NNNNN-of-NNNNN.parquet` shards (the Hub's naming, what prepare_data.py
    writes) gives each split its own rows; a split it lacks is refused with the ones it has."""
    table = _write_image_table(tmp_path)
    (tmp_path / "shards").mkdir()
    table.select(range(3)).to_parquet(str(tmp_path / "shards" / "train-00000-of-00002.parquet"))
    table.select(range(3, 4)).to_parquet(str(tmp_path / "shards" / "train-00001-of-00002.parquet"))
    table.select(range(4, 6)).to_parquet(str(tmp_path / "shards" / "validation-00000-of-00001.parquet"))
    assert len(load_images(str(tmp_path / "shards"), "train")) == 4
    assert len(load_images(str(tmp_path / "shards"), "validation")) == 2
    with pytest.raises(UsageError, match="not in .* hold: train, validation"):
        load_images(str(tmp_path / "shards"), "test")

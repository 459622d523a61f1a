"""Decode + augment throughput of the pretraining data pipeline, in images/s per CPU core.

    python benchmarks/bench_data.py                 # ImageNet-like JPEGs + built-in sets, every decode path
    python benchmarks/bench_data.py --images 200 --repeats 2 --builtins mnist5k   # quick

One process, one torch thread: images/s here is what one DataLoader worker delivers on one core.
Each arm runs the loop's own code (data.AugmentedImages + collate_images over a seeded shuffle of
whole batches), interleaved: every repeat runs each arm once, in a rotated order; the table gives
the median over repeats with min-max, and each arm's per-repeat ratio to `pil` (the path before).

Arms on the ImageNet-like JPEGs (natural colour photographs, ~500x375, quality 90, ~100 KB: crops of
the photographs in Debian's mate-backgrounds, or scikit-image's when that is not installed):
- pil: Pillow decodes the whole JPEG, torchvision crops and resizes the PIL image (--decode pil: the
  pipeline that decoded everything first);
- cpu: the default --decode cpu (DCT-domain downscaling when the crop is at least twice the output,
  else libjpeg-turbo through torchvision and torch's resize: mpp/data/augment.py);
- gpu-worker: what a worker does under --decode gpu (header, crop box, bytes); decoding moves to the GPU;
- prepared+pil / prepared+cpu: the same after recipes/prepare_data.py (shorter side --short-side).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results_io import provenance, provenance_lines, write_results

from mpp.data.images import AugmentedImages, collate_images
from mpp.data.loader import EpochBatches
from mpp.data.sources import find_image_column, load_images
from mpp.data.transforms import train_transform

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PHOTOS = "/usr/share/backgrounds/mate/nature"  # Debian mate-backgrounds: 12 photographs


def source_photos(folder: str = PHOTOS) -> tuple[list, str]:
    """(RGB arrays of natural photographs, where they came from)."""
    from PIL import Image

    files = sorted(Path(folder).glob("*.jpg")) if Path(folder).is_dir() else []
    if files:
        return [np.asarray(Image.open(f).convert("RGB")) for f in files], f"{len(files)} photographs of {folder}"
    from skimage import data

    return [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
    ], "4 scikit-image photographs (mate-backgrounds not installed)"


def imagenet_like(folder: Path, count: int, seed: int = 0, photos_dir: str = PHOTOS) -> dict:
    """count JPEGs like ImageNet's: 500x375 or 375x500 crops (20-100% of a photograph's side) at quality 90."""
    from PIL import Image

    photos, origin = source_photos(photos_dir)
    rng = np.random.default_rng(seed)
    (folder / "all").mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(count):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        portrait = rng.random() < 0.25
        side = int(min(h, w) * rng.uniform(0.2, 1.0))  # the crop's shorter side
        ch, cw = (int(side * 4 / 3), side) if portrait else (side, int(side * 4 / 3))
        ch, cw = min(ch, h), min(cw, w)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out = Image.fromarray(a[top : top + ch, left : left + cw]).resize(
            (375, 500) if portrait else (500, 375), Image.BICUBIC
        )
        path = folder / "all" / f"{i:05d}.jpg"
        out.save(path, quality=90)
        sizes.append(path.stat().st_size)
    return {
        "images": count,
        "source": origin,
        "mean_kb": statistics.mean(sizes) / 1024,
        "size": "500x375 (25% 375x500), quality 90",
    }


def arm_rate(dataset: str, img_size: int, batch_size: int, batches: int, decode: str, seed: int) -> float:
    """images/s of the loop's pipeline in this process (AugmentedImages.__getitems__ + collate)."""
    ds = load_images(dataset)
    transform = train_transform(img_size, decode="pil" if decode == "pil" else "cpu")
    images = AugmentedImages(ds, find_image_column(ds), transform, seed, defer=decode == "gpu-worker")
    epoch = iter(EpochBatches(len(images), batch_size, seed, span=False))  # the loop's batches of epoch 0
    batches = min(batches, len(images) // batch_size)
    if batches < 1:
        raise SystemExit(f"bench_data.py: {dataset} has {len(images)} images, fewer than one --batch-size {batch_size}")
    start = time.perf_counter()
    for _ in range(batches):
        collate_images(images.__getitems__(next(epoch)))
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--images", type=int, default=1000, help="ImageNet-like JPEGs to make and read (0: skip them)")
    p.add_argument("--img-size", type=int, default=224, help="output of RandomResizedCrop (224: ViT-B/16's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="batches timed per arm and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--short-side", type=int, default=256, help="prepare_data.py's bound for the prepared arms")
    p.add_argument(
        "--builtins", nargs="*", default=["mnist5k", "clipart", "photos"], help="built-in sets to time too (pil vs cpu)"
    )
    p.add_argument("--jpeg-dir", help="use this imagefolder of JPEGs instead of making ImageNet-like ones")
    p.add_argument(
        "--photos",
        default=PHOTOS,
        help="folder of photographs (.jpg) the ImageNet-like JPEGs are cut from "
        "(apt-get install mate-backgrounds; scikit-image's photographs when it is missing)",
    )
    p.add_argument("--out", default=str(RESULTS / "bench_data"))
    args = p.parse_args(argv)
    if 0 < args.images < args.batch_size:
        p.error(f"--images {args.images}: at least one --batch-size ({args.batch_size}) is needed to time a batch")
    torch.set_num_threads(1)  # per core: one worker's view
    rows, made = [], None
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.jpeg_dir or args.images:
            folder = Path(args.jpeg_dir) if args.jpeg_dir else Path(tmp) / "jpegs"
            if not args.jpeg_dir:
                made = imagenet_like(folder, args.images, photos_dir=args.photos)
            from mpp.data.prepare import prepare_dataset

            prepared = Path(tmp) / "prepared"
            start = time.perf_counter()
            prepare_dataset(str(folder), str(prepared), short_side=args.short_side, num_proc=1)
            made = {
                **(made or {}),
                "prepare_s_per_image_one_core": (time.perf_counter() - start) / max(1, len(load_images(str(folder)))),
            }
            sets.append(
                (
                    "ImageNet-like JPEGs",
                    [
                        ("pil", str(folder), "pil"),
                        ("cpu", str(folder), "cpu"),
                        ("gpu-worker", str(folder), "gpu-worker"),
                        (f"prepared {args.short_side}+pil", str(prepared), "pil"),
                        (f"prepared {args.short_side}+cpu", str(prepared), "cpu"),
                    ],
                )
            )
        for name in args.builtins:
            sets.append((name, [("pil", name, "pil"), ("cpu", name, "cpu")]))
        for name, arms in sets:
            for _, dataset, decode in arms:  # warm-up: caches, imports, the first Arrow reads
                arm_rate(dataset, args.img_size, args.batch_size, 1, decode, seed=99)
            runs = {arm: [] for arm, _, _ in arms}
            for r in range(args.repeats):
                for arm, dataset, decode in arms[r % len(arms) :] + arms[: r % len(arms)]:  # rotated order
                    runs[arm].append(arm_rate(dataset, args.img_size, args.batch_size, args.batches, decode, seed=r))
            base = runs["pil"]
            for arm, rates in runs.items():
                ratios = [a / b for a, b in zip(rates, base)]
                rows.append(
                    {
                        "data": name,
                        "arm": arm,
                        "images_per_sec_per_core": statistics.median(rates),
                        "min": min(rates),
                        "max": max(rates),
                        "runs": rates,
                        "vs_pil": statistics.median(ratios),
                        "vs_pil_min": min(ratios),
                        "vs_pil_max": max(ratios),
                    }
                )
                print(
                    f"{name:22s} {arm:22s} {statistics.median(rates):8.1f} img/s/core  "
                    f"x{statistics.median(ratios):.2f} "
                    "vs pil",
                    flush=True,
                )
    report = {
        **provenance("bench_data.py", argv),
        "load_average": os.getloadavg(),
        "config": {
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "repeats": args.repeats,
            "short_side": args.short_side,
            "torch_threads": 1,
        },
        "jpegs": made,
        "rows": rows,
    }
    write_results(args.out, report, markdown(report))
    return report


def markdown(r: dict) -> str:
    c, j = r["config"], r["jpegs"] or {}
    lines = [
        f"# bench_data: decode + RandomResizedCrop({c['img_size']}) + flip + collate, images/s per CPU core",
        "",
        *provenance_lines(r),
        "",
        f"One process, one torch thread; batches of {c['batch_size']}, {c['batches']} batches per arm and repeat, "
        f"{c['repeats']} "
        "repeats in rotated order; median (min-max) over repeats; x pil: median per-repeat ratio to the pil arm "
        "(the pipeline that decoded everything first) of the same data. Load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in r['load_average'])}.",
        "",
    ]
    if j:
        lines += [
            f"ImageNet-like JPEGs: {j.get('images', '?')} files, {j.get('size', '')}, mean "
            f"{j.get('mean_kb', float('nan')):.0f} KB, "
            f"from {j.get('source', '?')}. Preparing them (prepare_data.py, one core) took "
            f"{1e3 * j['prepare_s_per_image_one_core']:.1f} ms per image, once.",
            "",
        ]
    lines += ["| data | path | img/s per core | x pil |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(
            f"| {row['data']} | {row['arm']} | {row['images_per_sec_per_core']:.0f} "
            f"({row['min']:.0f}-{row['max']:.0f}) "
            "| "
            f"**{row['vs_pil']:.2f}** ({row['vs_pil_min']:.2f}-{row['vs_pil_max']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

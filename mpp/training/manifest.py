"""A checkpoint's manifest: each file's size and SHA-256, written last, checked before a resume.

A checkpoint folder gets its final name only when complete, but a file can still be damaged after
that (a disk error, a copy cut short, a sync that stopped half way). The manifest lets a resume tell
a damaged checkpoint from a good one before accelerate loads it: a truncated optimizer file or a
flipped byte in the weights would otherwise load, or fail deep inside torch.load, or resume from
wrong numbers.
"""

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Describe every file under folder (the manifest itself aside); call it once the rest is written."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum (or there is no
    manifest: a checkpoint written before manifests); else what is wrong, in a few words."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if sha256_of(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None

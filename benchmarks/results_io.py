"""What every benchmark records beside its numbers: the command, date, machine and versions; and
how it writes them (OUT.json and OUT.md, the table also printed)."""
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def provenance(script: str, argv: list[str] | None, device: str = "cpu") -> dict:
    import timm

    machine = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "CPU")
    return {
        "command": " ".join(["python", f"benchmarks/{script}"] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {machine}",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    }


def provenance_lines(r: dict) -> list[str]:
    return [f"Command: `{r['command']}`  ", f"Date: {r['date']}; machine: {r['machine']}; versions: {r['versions']}", ""]


def write_results(out: str | Path, report: dict, markdown: str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)

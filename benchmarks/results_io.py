"""What every benchmark records beside its numbers: the command, date, machine and versions; and
how it writes them (OUT.json and OUT.md, the table also printed)."""

import json
import os
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


def load_average() -> dict:
    """The machine's 1/5/15-minute load averages and its CPU count: how much other work competed for
    the cores while timing (a load above the CPU count means queued work)."""
    one, five, fifteen = os.getloadavg()
    return {"1min": one, "5min": five, "15min": fifteen, "cpus": os.cpu_count()}


def package_versions(names: list[str]) -> dict:
    """Installed versions of optional packages (peers), None where not installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def provenance_lines(r: dict) -> list[str]:
    lines = [f"Command: `{r['command']}`  ", f"Date: {r['date']}; machine: {r['machine']}; versions: {r['versions']}"]
    if "load_average_before" in r:  # recorded by benchmarks that time things on a possibly shared machine
        before, after = r["load_average_before"], r["load_average_after"]
        lines[-1] += "  "
        lines.append(
            f"Load average (1/5/15 min) before {before['1min']:.2f}/{before['5min']:.2f}/{before['15min']:.2f}, "
            f"after {after['1min']:.2f}/{after['5min']:.2f}/{after['15min']:.2f} (on {before['cpus']} CPUs)"
        )
    return lines + [""]


def write_results(out: str | Path, report: dict, markdown: str, echo: bool = True) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown)
    if echo:
        print(markdown)

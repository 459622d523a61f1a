"""What a run was launched with: kept per launch, and checked when a launch resumes a checkpoint.

A checkpoint stores the settings that decide what is trained (its `launch` record in
trainer_state.json). A resume that changes one of them would not continue the same run: another
process count or per-device batch reinterprets the data position and the step total, another seed,
dataset or model is another run. Such a resume is refused with one line naming the setting. The
settings in ACCEPTED only decide where, how often or how fast things happen; a resume may change them.

RUN/run_config.json            the configuration the run was started with (what --config replays); a
                               resume leaves it as it is
RUN/launches/launch-001.json   one file per launch, the first included: its configuration, the
                               checkpoint it resumed from (or none), when it started
"""

import json
from datetime import datetime
from pathlib import Path

from mpp.errors import UsageError
from mpp.models.hub_folder import RUN_CONFIG

# A resume may change these: they decide where output goes, how often it is written and how fast the
# run goes, not what is trained. (--threads, --compile and --grad-checkpointing can change the
# floating-point rounding; --workers does not change a map-style dataset's batches, which are seeded
# per batch, but does change a stream's sharding, so it is checked for --streaming.)
ACCEPTED = frozenset(
    {
        "output_dir",
        "resume",
        "config",
        "progress",
        "report_to",
        "push_to_hub",
        "hub_private",
        "log_every",
        "log_images_every",  # pictures of predictions: main process only, from their own seeded generator
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "strict_data",
        "threads",
        "compile",
        "compile_mode",
        "sdpa_backend",  # which attention kernel: how fast, not what is trained
        "grad_checkpointing",
        "workers",
        "derived",
    }
)
# the order in which a difference is reported when several differ
FIRST = (
    "processes",
    "batch_size",
    "grad_accum",
    "dataset",
    "dataset_config",
    "split",
    "train_split",
    "eval_split",
    "test_split",
    "streaming",
    "train_per_class",
    "train_fraction",
    "subset_seed",
    "model",
    "init",
    "img_size",
    "patch_size",
    "target",
    "mask_ratio",
    "mask_probs",
    "random_from",
    "corrupt_at",
    "seed",
    "mixed_precision",
)


def launch_record(config: dict, processes: int, mixed_precision: str) -> dict:
    """The settings a resume must keep: the configuration but ACCEPTED, with the process count and
    mixed precision (JSON-normalised, as the checkpoint stores them)."""
    record = {k: v for k, v in config.items() if k not in ACCEPTED or (k == "workers" and config.get("streaming"))}
    record.update(processes=processes, mixed_precision=mixed_precision)
    return json.loads(json.dumps(record))


def _setting(key: str, value) -> str:
    if key == "processes":
        return f"{value} process{'es' if value != 1 else ''}"
    if key == "mixed_precision":
        return f"mixed precision {value}"
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if value is None:
        return f"no {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def check_resume(saved: dict | None, now: dict, checkpoint: Path) -> None:
    """Refuse, in one line, a resume whose launch differs from the checkpoint's in a setting that decides
    what is trained. A checkpoint written before these records has none and is not checked."""
    if not saved:
        return
    differing = [k for k in set(saved) | set(now) if saved.get(k) != now.get(k)]
    if not differing:
        return
    key = min(differing, key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))
    raise UsageError(
        f"--resume: {checkpoint} was made with {_setting(key, saved.get(key))}, this launch has "
        f"{_setting(key, now.get(key))}; resume with the checkpoint's setting, or start a new run in another "
        "--output-dir"
    )


def record_launch(run_dir: Path, config: dict, resumed_from: Path | None) -> Path:
    """launches/launch-NNN.json for this launch; run_config.json too when it starts the run (no checkpoint to
    resume from: the first launch, or one that found no checkpoint and starts over) or the folder has none
    yet (a resume from another run's checkpoint). Main process only."""
    folder = run_dir / "launches"
    folder.mkdir(exist_ok=True)
    path = folder / f"launch-{1 + len(list(folder.glob('launch-*.json'))):03d}.json"
    path.write_text(
        json.dumps(
            {
                "started": datetime.now().isoformat(timespec="seconds"),
                "resumed_from": str(resumed_from) if resumed_from else None,
                "config": config,
            },
            indent=2,
        )
    )
    if resumed_from is None or not (run_dir / RUN_CONFIG).exists():
        (run_dir / RUN_CONFIG).write_text(json.dumps(config, indent=2))
    return path

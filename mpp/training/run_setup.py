"""A run's processes and folder: process group and threads, the run folder claimed or resumed, its trackers, its
summary.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    TorchDynamoPlugin,
    broadcast_object_list,
    parse_flag_from_env,
)

from mpp.errors import UsageError
from mpp.training.checkpoint import (
    STATE_FILE,
    check_checkpoint,
    read_trainer_state,
    usable_checkpoint,
)
from mpp.training.launches import check_resume, launch_record, record_launch
from mpp.training.records import read_records, trim_metrics
from mpp.training.run_dir import claim_run_dir
from mpp.training.trackers import PROJECT, build_trackers
from mpp.training.xla import (
    is_xla,
    load_models_through_cpu,
    make_loader_checkpointable,
    refuse_compile_on_xla,
)

FRESH_STATE = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "bad_images": 0}


def init_processes(threads: int | None, compile: bool = False) -> PartialState:
    """Start the process group and give each CPU process its share of the cores; refuse what the
    device cannot do (--compile on XLA) before any heavy work.

    AcceleratorState honours ACCELERATE_USE_CPU, a bare PartialState does not. accelerate launch
    without a config sets OMP_NUM_THREADS=1, which would halve a 2-core CPU run.
    """
    dist = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    refuse_compile_on_xla(compile, dist.device)
    if dist.device.type == "cpu" or threads:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.num_processes))
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local_processes))
    return dist


def check_resume_path(resume: str | None) -> Path | None:
    """--resume PATH must be a complete checkpoint; 'auto' is resolved once the run folder is known."""
    if not resume or resume == "auto":
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(
            f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); use 'auto' or a "
            "checkpoints/step_N "
            "folder"
        )
    return path


@dataclass
class Run:
    accelerator: Accelerator
    run_dir: Path
    resume_from: Path | None
    state: dict  # step, epoch, batches_in_epoch, bad_images at the start
    launch: dict = field(default_factory=dict)  # what each checkpoint records and a resume must keep (launches.py)
    records: int = 0  # metrics.jsonl records so far (main process); each checkpoint stores the count


def open_run_for(dist: PartialState, cfg) -> Run:
    """open_run with a command's RunConfig: its folder, resume, accumulation, compilation and trackers."""
    return open_run(
        dist,
        cfg.output_dir,
        cfg.resume,
        cfg.grad_accum,
        cfg.compile,
        cfg.report_to,
        settings=cfg.to_dict(),
        compile_mode=cfg.compile_mode,
    )


def open_run(
    dist: PartialState,
    output_dir: str | None,
    resume: str | None,
    grad_accum: int,
    compile: bool = False,
    report_to: str = "tensorboard",
    settings: dict | None = None,
    compile_mode: str = "default",  # torch.compile's mode with compile
) -> Run:
    """Name, check and make the run folder, find the checkpoint to resume from, create the Accelerator.
    settings: the run's configuration; a resume that changes what it trains is refused (launches.py)."""
    resume_from = check_resume_path(resume)
    # The main process makes and holds the run folder and checks the checkpoint's files against its
    # manifest; every process takes its answers (a refusal too) before accelerate's trackers need them.
    claimed = [None, None, None]  # run folder, checkpoint, refusal
    if dist.is_main_process:
        try:
            run_dir = claim_run_dir(output_dir, resume)
            if resume == "auto":
                resume_from = usable_checkpoint(run_dir, lambda line: print(line, flush=True))
            elif resume_from is not None:
                check_checkpoint(resume_from, "--resume")
            claimed = [str(run_dir), str(resume_from) if resume_from else None, None]
        except UsageError as e:
            claimed[2] = str(e)
    run_dir, resume_from, refused = broadcast_object_list(claimed)
    if refused:
        raise UsageError(refused)
    run_dir, resume_from = Path(run_dir), Path(resume_from) if resume_from else None
    state = read_trainer_state(resume_from) if resume_from else dict(FRESH_STATE)
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum,
        log_with=build_trackers(report_to, run_dir, resumed_at=state["step"] if resume_from else None),  # --report-to
        project_dir=str(run_dir),
        # non_blocking: batches from pinned memory are copied while the previous step still runs (GPU)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # accelerate compiles in prepare() and unwraps for saving; `accelerate launch --dynamo_backend` works too
        **(
            {
                "dynamo_plugin": TorchDynamoPlugin(
                    backend="inductor", mode=None if compile_mode == "default" else compile_mode
                )
            }
            if compile
            else {}
        ),
    )
    launch = (
        launch_record(settings, accelerator.num_processes, accelerator.mixed_precision) if settings is not None else {}
    )
    if resume_from:
        check_resume(state.get("launch"), launch, resume_from)
    if is_xla(accelerator.device):
        make_loader_checkpointable()
        accelerator.register_load_state_pre_hook(load_models_through_cpu)
    return Run(accelerator, run_dir, resume_from, state, launch)


def start_logging(run: Run, config: dict) -> None:
    """This launch's configuration (launches.record_launch), metrics.jsonl trimmed to the checkpoint, the
    --report-to trackers through accelerate."""
    if run.accelerator.is_main_process:
        record_launch(run.run_dir, config, run.resume_from)
        own = run.resume_from is not None and run.resume_from.resolve().parent.parent == run.run_dir.resolve()
        run.state["epoch_end_logged"] = trim_metrics(run.run_dir / "metrics.jsonl", run.state, own)
        run.records = len(read_records(run.run_dir / "metrics.jsonl"))
    # TensorBoard hparams take scalars and strings only
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items() if k != "derived"}
    run.accelerator.init_trackers(PROJECT, config=flat)
    if run.resume_from:
        run.accelerator.print(f"resumed from {run.resume_from} at step {run.state['step']}")


def finish(run: Run) -> None:
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()  # closes the trackers (and, in accelerate >= 1.x, the process group)


def write_record(run: Run, record: dict) -> None:
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if run.accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        run.records += 1

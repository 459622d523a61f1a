"""Publishing a run folder (a timm hub folder) to the Hugging Face Hub with huggingface_hub.

check_can_push runs before any training: a run that cannot be published at its end is refused
with one line, not discovered after hours. push_run uploads the folder without its checkpoints.
"""
import json
import os
from pathlib import Path

from mpp.errors import UsageError
from mpp.models.hub_folder import TIMM_CONFIG

# accelerate's training state is large and of no use to a downstream user
NOT_UPLOADED = ["checkpoints/*", "checkpoints/**", ".tmp-*", "*.tmp"]


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_can_push(repo_id: str, flag: str = "--push-to-hub") -> None:
    """Refuses (UsageError) an invalid repo id, offline mode, a missing token, or a Hub that does not
    accept the token (checked with whoami, one request)."""
    instead = f"; or leave out {flag}" if flag.startswith("--") else ""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{flag} {repo_id}: not a Hub repo id (USER/NAME or ORG/NAME): {str(e).splitlines()[0]}") from None
    if _offline():
        raise UsageError(f"{flag} {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it{instead}")
    if not get_token():
        raise UsageError(f"{flag} {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN){instead}")
    try:
        HfApi().whoami()
    except Exception as e:  # network down, token refused, ...: all mean the upload at the end would fail
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{flag} {repo_id}: the Hub does not answer to this token ({reason[:200]})") from None


def check_hub_folder(run_dir: Path) -> None:
    """A finished run folder: model.safetensors and timm's config.json (runs from before mpp wrote one have a run config there)."""
    config = run_dir / TIMM_CONFIG
    if not (run_dir / "model.safetensors").is_file() or not config.is_file() or "architecture" not in json.loads(config.read_text()):
        raise UsageError(f"RUN_DIR {run_dir}: not a finished run folder with model.safetensors and timm's config.json "
                         "(runs made before mpp wrote timm's config.json: fine-tune or pretrain again, or load the file with mpp.load_backbone)")


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Creates the model repo if needed and uploads the run folder, checkpoints left out; returns the commit URL."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(run_dir), ignore_patterns=NOT_UPLOADED,
                               commit_message=message or f"mpp run {run_dir.name}")
    return str(getattr(commit, "commit_url", commit))


def publish(run_dir: Path, repo_id: str, private: bool = False) -> str:
    """push_run with a line saying where the run went (the end of --push-to-hub and of `python -m mpp push`)."""
    url = push_run(run_dir, repo_id, private)
    print(f"pushed {run_dir} to https://huggingface.co/{repo_id} ({url}); load it with "
          f"timm.create_model(\"hf-hub:{repo_id}\", pretrained=True)", flush=True)
    return url

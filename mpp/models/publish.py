"""Publishing a run folder (a timm hub folder) to the Hugging Face Hub with huggingface_hub.

check_can_push runs before any training: a run that cannot be published at its end (no network, no token,
a read-only token, a private push into a public repo) is refused with one line, not discovered after hours.
push_run uploads an allow-list of the folder's files, with no path of the machine the run was made on.
"""

import json
import os
import re
from pathlib import Path

from mpp.errors import UsageError
from mpp.models.hub_folder import MODEL_CARD, RUN_CONFIG, TIMM_CONFIG, public_path

# What a downstream user needs: the weights, timm's config, the card, the run's configuration and its numbers.
# Checkpoints, best/last weights, tracker folders (wandb/, tensorboard/: logs with local paths, host names, pids)
# and anything else in the folder stay local.
UPLOADED = ("model.safetensors", TIMM_CONFIG, MODEL_CARD, RUN_CONFIG, "metrics.jsonl", "summary.json")
# an absolute path inside a string: at its start or after a space, quote, bracket or '='
ABSOLUTE_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"(\[=]))(?:/|~/|[A-Za-z]:\\)[^\s'\"\])]*")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_can_push(repo_id: str, flag: str = "--push-to-hub", private: bool = False) -> None:
    """Refuses (UsageError) an invalid repo id, offline mode, a missing token, a Hub that does not accept the token
    (whoami), a token that cannot write to the repo's namespace, and, for a private push, an existing public repo."""
    instead = f"; or leave out {flag}" if flag.startswith("--") else ""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(
            f"{flag} {repo_id}: not a Hub repo id (USER/NAME or ORG/NAME): {str(e).splitlines()[0]}"
        ) from None
    if _offline():
        raise UsageError(f"{flag} {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it{instead}")
    if not get_token():
        raise UsageError(f"{flag} {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN){instead}")
    api = HfApi()
    try:
        me = api.whoami()
    except Exception as e:  # network down, token refused, ...: all mean the upload at the end would fail
        raise UsageError(f"{flag} {repo_id}: the Hub does not answer to this token ({_reason(e)})") from None
    why_not = cannot_write(me, repo_id)
    if why_not:
        raise UsageError(f"{flag} {repo_id}: {why_not}; use a token with write access (hf auth login){instead}")
    if private:
        check_private(api, repo_id, flag)


def _reason(e: Exception) -> str:
    return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]


def cannot_write(me: dict, repo_id: str) -> str | None:
    """Why the token whoami describes cannot write to repo_id, or None when it can (or whoami does not say).
    whoami-v2's auth.accessToken has a role: read, write, or fineGrained with permissions per entity (a user,
    an organisation or one repo) and global ones."""
    token = (me.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "read":
        return f"the token is read-only (role read), and writing to {repo_id} needs a write token"
    if role == "fineGrained":
        fine = token.get("fineGrained") or {}
        namespace = repo_id.split("/")[0]
        scopes = [
            s.get("permissions", [])
            for s in fine.get("scoped", [])
            if (s.get("entity") or {}).get("name") in (namespace, repo_id)
        ]
        if not any("repo.write" in p for p in scopes) and "repo.write" not in fine.get("global", []):
            return f"the fine-grained token has no repo.write permission for {namespace}"
    return None


def check_private(api, repo_id: str, flag: str) -> None:
    """A private push: the repo does not exist yet (it is created private) or exists and is private."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return
    except Exception as e:
        raise UsageError(
            f"{flag} {repo_id} with --hub-private: cannot tell whether the repo is private ({_reason(e)})"
        ) from None
    if not info.private:
        raise UsageError(
            f"{flag} {repo_id} with --hub-private: the repo exists and is public, so the upload would be public; "
            "make it private on the Hub first, or choose another repo"
        )


def check_hub_folder(run_dir: Path) -> None:
    """A finished run folder: model.safetensors and timm's config.json (runs from before mpp wrote one have a run config
    there)."""
    config = run_dir / TIMM_CONFIG
    if (
        not (run_dir / "model.safetensors").is_file()
        or not config.is_file()
        or "architecture" not in json.loads(config.read_text())
    ):
        raise UsageError(
            f"RUN_DIR {run_dir}: not a finished run folder with model.safetensors and timm's config.json "
            "(runs made before mpp wrote timm's config.json: fine-tune or pretrain again, or load the file with "
            "mpp.load_backbone)"
        )


def without_local_paths(value):
    """A JSON value with every absolute path in its strings replaced by its public form (hub_folder.public_path)."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda m: public_path(m.group(0)), value)
    return value


def public_copy(path: Path) -> bytes | str:
    """What is uploaded for one file: the weights as they are (their metadata holds no local path), text files with
    their absolute paths replaced (JSON through its values; the card is written without any)."""
    if path.suffix == ".safetensors":
        return str(path)
    text = path.read_text()
    if path.suffix == ".json":
        text = json.dumps(without_local_paths(json.loads(text)), indent=2)
    elif path.suffix == ".jsonl":
        text = "".join(
            json.dumps(without_local_paths(json.loads(line))) + "\n" for line in text.splitlines() if line.strip()
        )
    return text.encode()


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Creates the model repo if needed and uploads the allow-listed files in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = Path(run_dir)
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=public_copy(run_dir / name))
        for name in UPLOADED
        if (run_dir / name).is_file()
    ]
    commit = api.create_commit(
        repo_id, operations, commit_message=message or f"mpp run {run_dir.name}", repo_type="model"
    )
    return str(getattr(commit, "commit_url", commit))


def publish(run_dir: Path, repo_id: str, private: bool = False) -> str:
    """push_run with a line saying where the run went (the end of --push-to-hub and of `python -m mpp push`)."""
    url = push_run(run_dir, repo_id, private)
    print(
        f"pushed {run_dir} to https://huggingface.co/{repo_id} ({url}); load it with "
        f'timm.create_model("hf-hub:{repo_id}", pretrained=True)',
        flush=True,
    )
    return url

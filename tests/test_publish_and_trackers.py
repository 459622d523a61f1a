"""--push-to-hub (everything up to huggingface_hub's upload call) and --report-to (accelerate's trackers, offline)."""
import json

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from mpp.commands.pretrain import main as pretrain_main
from mpp.commands.push import main as push_main
from mpp.training import trackers

TINY = ["--dataset", "mnist5k", "--model", "test_vit", "--img-size", "28", "--patch-size", "7", "--batch-size", "8",
        "--max-steps", "4", "--log-every", "2", "--checkpoint-every", "2", "--no-progress", "--workers", "0"]


@pytest.fixture()
def hub(monkeypatch):
    """A Hub that answers: online, a token, whoami works; create_repo and upload_folder are recorded, not sent."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = []
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "someone"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create_repo", repo_id, k)))

    def upload_folder(self, **k):
        # what huggingface_hub would upload: the folder's files filtered by the same patterns
        files = sorted(str(p.relative_to(k["folder_path"])) for p in __import__("pathlib").Path(k["folder_path"]).rglob("*") if p.is_file())
        calls.append(("upload_folder", k["repo_id"], {**k, "files": list(filter_repo_objects(files, ignore_patterns=k["ignore_patterns"]))}))
        return "https://huggingface.co/someone/mpp-test/commit/0"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_a_finished_run_is_uploaded_as_a_hub_folder_without_checkpoints(hub, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_main([*TINY, "--output-dir", str(out), "--push-to-hub", "someone/mpp-test", "--hub-private"]) == 0
    (_, repo, create), (_, repo2, upload) = hub
    assert repo == repo2 == "someone/mpp-test" and create["private"] is True and create["exist_ok"] is True
    assert upload["folder_path"] == str(out) and upload["repo_type"] == "model"
    assert {"model.safetensors", "config.json", "README.md", "run_config.json", "metrics.jsonl"} <= set(upload["files"])
    assert (out / "checkpoints").is_dir() and not any(f.startswith("checkpoints") for f in upload["files"])
    assert 'hf-hub:someone/mpp-test' in capsys.readouterr().out


def test_the_push_command_uploads_an_existing_run(hub, tmp_path):
    out = tmp_path / "run"
    assert pretrain_main([*TINY, "--output-dir", str(out)]) == 0
    assert hub == []  # no --push-to-hub: nothing sent
    assert push_main([str(out), "someone/later"]) == 0
    assert [c[:2] for c in hub] == [("create_repo", "someone/later"), ("upload_folder", "someone/later")]


@pytest.mark.parametrize("env, whoami_fails, expected", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "x"}, False, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}, False, "no Hugging Face token"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "x"}, True, "the Hub does not answer to this token (no route to host)"),
])
def test_a_push_that_cannot_happen_is_refused_before_training(refused, monkeypatch, tmp_path, env, whoami_fails, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token file from this machine

    def whoami(self, *a, **k):
        if whoami_fails:
            raise OSError("no route to host")
        return {"name": "someone"}

    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded"))
    line = refused(pretrain_main, [*TINY, "--push-to-hub", "someone/mpp-test"])
    assert line.startswith("error: --push-to-hub someone/mpp-test: ") and expected in line


def test_a_bad_repo_id_and_a_folder_that_is_not_a_run_are_refused(refused, tmp_path, capsys):
    line = refused(pretrain_main, [*TINY, "--push-to-hub", "not a repo"])
    assert "--push-to-hub not a repo: not a Hub repo id" in line
    with pytest.raises(SystemExit) as e:
        from mpp.cli import run_cli
        run_cli(push_main, [str(tmp_path), "someone/x"])
    assert e.value.code == 2 and "not a finished run folder" in capsys.readouterr().err


def records(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_report_to_none_keeps_metrics_jsonl_only(tmp_path):
    out = tmp_path / "run"
    assert pretrain_main([*TINY, "--output-dir", str(out), "--report-to", "none"]) == 0
    assert len(records(out)) == 2 and not (out / "tensorboard").exists()


def test_report_to_mlflow_logs_the_same_numbers_to_a_file_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it (a database store needs SQLAlchemy)
    out = tmp_path / "run"
    assert pretrain_main([*TINY, "--output-dir", str(out), "--report-to", "mlflow"]) == 0
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "mpp"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.params["model"] == "test_vit"
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    expected = [(r["step"], r["loss"]) for r in records(out)]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [2, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected])
    assert not (out / "tensorboard").exists()


def test_report_to_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent = []  # what reached the real (offline) wandb run, which keeps it in a binary file
    real_log = wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda self, data, *a, **k: (sent.append((k.get("step"), data)), real_log(self, data, *a, **k))[1])
    out = tmp_path / "run"
    assert pretrain_main([*TINY, "--output-dir", str(out), "--report-to", "wandb"]) == 0
    (offline_run,) = (out / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))[0].stat().st_size > 0
    losses = [(step, data["loss"]) for step, data in sent if "loss" in data]
    assert losses == [(r["step"], r["loss"]) for r in records(out)]


def test_a_tracker_that_is_not_installed_is_refused_with_its_extra(refused, monkeypatch):
    monkeypatch.setattr(trackers, "_installed", lambda name: name == "tensorboard")
    line = refused(pretrain_main, [*TINY, "--report-to", "wandb"])
    assert line == "error: --report-to wandb: wandb is not installed; pip install 'vit-mpp[wandb]'"
    assert trackers.tracker_names("all") == ["tensorboard"]

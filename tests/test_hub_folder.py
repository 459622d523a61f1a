"""Run folders are timm hub folders: timm.create_model("local-dir:RUN", pretrained=True) in a process without mpp."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from mpp.commands.finetune import parse_config as parse_finetune_config
from mpp.models.hub_folder import RUN_CONFIG, read_run_config
from mpp.models.weights import read_metadata
from mpp.training.finetune import finetune

# Loads the folder with timm alone: importing mpp fails in this process, so nothing of it can help.
LOAD_WITHOUT_MPP = """
import sys
sys.modules["mpp"] = None
import json, timm, torch
run, x_file, out_file = sys.argv[1:4]
model = timm.create_model("local-dir:" + run, pretrained=True).eval()
with torch.no_grad():
    out = model(torch.load(x_file))
torch.save(out, out_file)
cfg = model.pretrained_cfg
print(json.dumps({"num_classes": model.num_classes, "img_size": list(model.patch_embed.img_size),
                  "mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": list(cfg["input_size"]),
                  "label_names": list(cfg.get("label_names") or [])}))
"""


def load_without_mpp(run: Path, x: torch.Tensor, tmp_path: Path) -> tuple[dict, torch.Tensor]:
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_MPP, str(run), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "out.pt")


def test_a_pretraining_run_loads_in_timm_alone(exported, tmp_path):
    run, model = exported
    x = torch.randn(2, 3, 28, 28)
    info, out = load_without_mpp(run, x, tmp_path)
    encoder = model.encoder.eval()
    with torch.no_grad():
        expected = encoder(x)  # the model that was exported, run here: an independent path to the same numbers
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert info["num_classes"] == 0 and info["img_size"] == [28, 28] and info["input_size"] == [3, 28, 28]
    assert info["mean"] == list(encoder.pretrained_cfg["mean"]) and info["std"] == list(encoder.pretrained_cfg["std"])


def test_the_model_card_has_hub_front_matter_and_says_how_to_load(exported):
    run, _ = exported
    card = (run / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "timm" and "masked-patch-prediction" in front["tags"] and front["license"]
    assert f'timm.create_model("local-dir:path/to/{run.name}", pretrained=True)' in card and str(run) not in card
    timm_config = json.loads((run / "config.json").read_text())
    args = timm_config["model_args"]
    assert timm_config["architecture"] == "test_vit" and args["patch_size"] == 7 and args["img_size"] in (28, [28, 28])


@pytest.fixture(scope="module")
def digits(make_digit_folder):
    """MNIST digits 0-2 in class folders named zero, one, two: 6 per class to train on, 3 to evaluate."""
    return make_digit_folder(["zero", "one", "two"], train=6, test=3)


def test_a_fine_tuned_run_loads_in_timm_alone_with_its_labels(exported, digits, tmp_path, hub):
    run, _ = exported
    out_dir = tmp_path / "ft"
    finetune(
        parse_finetune_config(
            [
                "--dataset",
                str(digits),
                "--init",
                str(run / "model.safetensors"),
                "--max-steps",
                "2",
                "--batch-size",
                "6",
                "--no-progress",
                "--workers",
                "0",
                "--output-dir",
                str(out_dir),
            ]
        )
    )
    x = torch.randn(2, 3, 28, 28)
    info, out = load_without_mpp(out_dir, x, tmp_path)
    reference = timm.create_model("test_vit", num_classes=3, img_size=28, patch_size=7).eval()
    reference.load_state_dict(load_file(out_dir / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    names = read_metadata(out_dir / "model.safetensors")["class_names"]  # the classifier's order
    assert info["num_classes"] == 3 and info["label_names"] == names and sorted(names) == ["one", "two", "zero"]
    results = json.loads((out_dir / "results.json").read_text())
    card = (out_dir / "README.md").read_text()
    assert "image-classification" in yaml.safe_load(card.split("---\n")[1])["tags"]
    assert f"{results['final_top1']:.4f}" in card
    assert read_run_config(out_dir)["init"] == str(run / "model.safetensors")
    # published: the allow-list, and no path of this machine in the card, the configuration or the weights' metadata
    from mpp.commands.push import main as push_main

    assert push_main([str(out_dir), "someone/ft"]) == 0
    files = hub[-1][2]["files"]
    assert set(files) == {
        "model.safetensors",
        "config.json",
        "README.md",
        "run_config.json",
        "metrics.jsonl",
        "summary.json",
    }
    for name, content in files.items():
        for local in (out_dir, run, digits):
            assert str(local).encode() not in content, (name, local)
    assert json.loads(files["run_config.json"])["init"] == f"<local>/{run.name}/model.safetensors"


def test_the_run_config_is_its_own_file_and_old_folders_still_read(exported, tmp_path):
    run, _ = exported
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"dataset": "mnist5k", "mask_ratio": 0.4}))  # before run_config.json
    assert read_run_config(old)["mask_ratio"] == 0.4
    (old / RUN_CONFIG).write_text(json.dumps({"dataset": "x"}))
    assert read_run_config(old)["dataset"] == "x"
    assert read_run_config(run) == {}  # config.json there is timm's, not a run configuration

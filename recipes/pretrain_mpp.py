"""Masked patch prediction pretraining.  accelerate launch recipes/pretrain_mpp.py --help"""
from accelerate.state import PartialState

from mpp.cli import exit_cleanly, parse_config, run_cli
from mpp.train import pretrain


def main(argv=None):
    cfg = parse_config(argv)  # every flag checked before anything heavy
    run_dir = pretrain(cfg).run_dir
    if PartialState().is_main_process:
        print(f"MPP pretraining finished: {run_dir}/model.safetensors")


if __name__ == "__main__":
    run_cli(main)
    exit_cleanly(0)

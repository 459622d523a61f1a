"""python -m mpp COMMAND [flags]: the recipes, from an installed package (pip install vit-mpp).

python -m mpp pretrain --help
accelerate launch -m mpp pretrain --dataset DIR        # distributed: accelerate runs this module
python -m mpp finetune --init runs/RUN/model.safetensors --dataset DIR
"""

import importlib
import sys

COMMANDS = {  # command: (module, what it does)
    "pretrain": ("mpp.commands.pretrain", "MPP pretraining of a timm ViT (recipes/pretrain_mpp.py)"),
    "finetune": ("mpp.commands.finetune", "fine-tune from scratch, MPP or supervised weights (recipes/finetune.py)"),
    "gap": (
        "mpp.commands.gap",
        "the transfer gap experiment: scratch vs MPP vs supervised over seeds (recipes/gap.py)",
    ),
    "ablate": ("mpp.commands.ablate", "Appendix B.1.2 in miniature, with verdicts (recipes/ablate.py)"),
    "inspect": ("mpp.commands.inspect", "figures and a report of what a run learned (recipes/inspect_run.py)"),
    "prepare": (
        "mpp.commands.prepare",
        "re-encode a dataset once into small-JPEG parquet shards (recipes/prepare_data.py)",
    ),
    "push": ("mpp.commands.push", "upload a finished run folder to the Hugging Face Hub (recipes/push_to_hub.py)"),
}


def usage() -> str:
    return "usage: python -m mpp COMMAND [--help]\n" + "\n".join(
        f"  {name:9s} {what}" for name, (_, what) in COMMANDS.items()
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(
            f"python -m mpp: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)} (see python -m mpp --help)",
            file=sys.stderr,
        )
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""python -m mpp COMMAND [flags]: the recipes, from an installed package (pip install vit-mpp).

python -m mpp pretrain --help
accelerate launch -m mpp pretrain --dataset DIR        # distributed: accelerate runs this module
python -m mpp finetune --init runs/RUN/model.safetensors --dataset DIR
"""

import importlib
import sys

from mpp.commands import COMMANDS


def usage() -> str:
    return "usage: python -m mpp COMMAND [--help]\n" + "\n".join(
        f"  {name:9s} {c.what} (recipes/{c.recipe})" for name, c in COMMANDS.items()
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
    return importlib.import_module(COMMANDS[argv[0]].module).cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

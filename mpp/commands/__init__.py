"""The command-line entry points, one module each (its parser, main and cli): `python -m mpp <command>` and the thin
scripts in recipes/. COMMANDS is the one table of them."""

from typing import NamedTuple


class Command(NamedTuple):
    module: str
    recipe: str  # its script in recipes/
    what: str  # one line for `python -m mpp --help`


COMMANDS = {
    "pretrain": Command("mpp.commands.pretrain", "pretrain_mpp.py", "MPP pretraining of a timm ViT"),
    "finetune": Command("mpp.commands.finetune", "finetune.py", "fine-tune from scratch, MPP or supervised weights"),
    "gap": Command(
        "mpp.commands.gap", "gap.py", "the transfer gap experiment: scratch vs MPP vs supervised over seeds"
    ),
    "ablate": Command("mpp.commands.ablate", "ablate.py", "Appendix B.1.2 in miniature, with verdicts"),
    "inspect": Command("mpp.commands.inspect", "inspect_run.py", "figures and a report of what a run learned"),
    "prepare": Command(
        "mpp.commands.prepare", "prepare_data.py", "re-encode a dataset once into small-JPEG parquet shards"
    ),
    "push": Command("mpp.commands.push", "push_to_hub.py", "upload a finished run folder to the Hugging Face Hub"),
}

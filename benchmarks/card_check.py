"""Each published checkpoint scored the way its card tells a user to run it: ``timm.create_model(tag, pretrained=True)``,
``resolve_data_config(model=model)`` + ``create_transform(**data_config)`` on each Fashion-MNIST test image as a PIL
image (read from the Debian package), against the top-1 its card states. Exits 1 when a card is off by more than
0.01 points.

    python benchmarks/card_check.py [checkpoints/timm-mpc] [--limit N]
"""
import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from PIL import Image
from tqdm import tqdm

import timm_mpc  # noqa: F401  registers the mpcvit_* models
from timm_mpc.training.data import build_dataset


def user_top1(name: str, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 (%) of ``name`` on grey uint8 ``images`` through the card's usage snippet."""
    model = timm.create_model(name, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    correct = 0
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch), desc=name, leave=False):
            x = torch.stack([transform(Image.fromarray(img.numpy()).convert('RGB')) for img in images[start:start + batch]])
            correct += (model(x).argmax(-1) == labels[start:start + batch]).sum().item()
    return 100 * correct / len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', nargs='?', default='checkpoints/timm-mpc', help='the published repository folders')
    parser.add_argument('--limit', type=int, default=None, help='the first N test images only (the card is not compared)')
    args = parser.parse_args()
    test = build_dataset('fashion_mnist', 'test')
    images, labels = test.data, test.targets
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    print('| checkpoint | card top-1 (%) | through timm\'s transform (%) | difference |')
    print('|---|---:|---:|---:|')
    off = []
    for folder in sorted(Path(args.root).iterdir()):
        card = json.loads((folder / 'results.json').read_text())['plain']['top1']
        measured = user_top1(folder.name, images, labels)
        print(f'| `{folder.name}` | {card:.2f} | {measured:.2f} | {measured - card:+.2f} |', flush=True)
        if not args.limit and abs(measured - card) > 0.01:
            off.append(folder.name)
    if off:
        print(f'cards off by more than 0.01 points: {off}', file=sys.stderr)
    return 1 if off else 0


if __name__ == '__main__':
    sys.exit(main())

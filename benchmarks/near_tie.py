"""Secure runs of chosen test images, repeated, under today's protocol and the previous one: each image's plain-text
top-2 margin beside the secure margin of the same two classes in every run, and each run's largest logit error. Tells
a near-tie whose top-1 flips with the run's randomness (CrypTen's truncation is probabilistic) from a bias of one
protocol. The test images and the owner's 64 calibration images are the ones `timm-mpc eval --secure-images` uses.

    HF_HUB_OFFLINE=1 python benchmarks/near_tie.py [--model mpcvit_tiny.fmnist_mu50_kd] [--images 192 413] [--runs 2]
        [--protocols today previous]
"""
import argparse

import torch

from timm_mpc import create_mpc_model
from timm_mpc.secure import secure_predict
from timm_mpc.secure.settings import SecureSettings

from secure_engines import first_images

PROTOCOLS = {'today': SecureSettings(), 'previous': SecureSettings(fss_comparisons=False, weight_masks=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='mpcvit_tiny.fmnist_mu50_kd')
    parser.add_argument('--images', type=int, nargs='+', default=[192, 413], help='indices into the test set')
    parser.add_argument('--runs', type=int, default=2, help='secure runs per protocol')
    parser.add_argument('--protocols', nargs='+', choices=list(PROTOCOLS), default=list(PROTOCOLS))
    args = parser.parse_args()
    if args.runs < 1 or min(args.images) < 0:
        parser.error(f'--runs must be at least 1 and --images non-negative; got {args.runs} and {args.images}')
    model = create_mpc_model(args.model, pretrained=True).eval()
    images = first_images(model, 'test', max(args.images) + 1)[0][args.images]
    calibration, _ = first_images(model, 'train', 64)
    with torch.no_grad():
        plain = model(images)
    top2 = plain.topk(2, dim=-1).indices
    margin = lambda logits: logits.gather(-1, top2).diff(dim=-1).neg().squeeze(-1)  # noqa: E731  top-1 minus top-2
    print(f'{args.model}, test images {args.images}: plain-text top-2 margins '
          f'{[round(float(m), 5) for m in margin(plain)]}')
    for name in args.protocols:
        for run in range(args.runs):
            secure = secure_predict(model, images, settings=PROTOCOLS[name], calibration_images=calibration)
            errors = (secure - plain).abs().amax(-1)
            print(f'{name} protocol, run {run + 1}: secure margins {[round(float(m), 5) for m in margin(secure)]}, '
                  f'largest logit errors {[round(float(e), 4) for e in errors]}', flush=True)


if __name__ == '__main__':
    main()

"""The ``timm-mpc`` command line."""
import argparse
import json
import sys
from typing import List, Optional

import timm
import torch

from . import __version__
from .convert import SUPPORTED_FAMILIES, convert_to_mpc
from .layers.register import ACT_LAYER_NAMES, ATTN_LAYER_NAMES
from .layers.attn_kinds import ATTN_KINDS

__all__ = ['main']


def _info(args: argparse.Namespace) -> int:
    print(f'timm-mpc {__version__} (timm {timm.__version__}, torch {torch.__version__})')
    print('models:')
    for name in timm.list_models('mpcvit_*'):
        tags = timm.list_pretrained(f"{name}.*")
        print(f'  {name:14s} Hub tags: {", ".join(t.split(".", 1)[1] for t in tags) or "none (load a local file)"}')
    print(f'attention kinds (per head): {", ".join(ATTN_KINDS)}, or search')
    print(f'timm attn_layer names: {", ".join(ATTN_LAYER_NAMES)}')
    print(f'timm act_layer names: {", ".join(ACT_LAYER_NAMES)} (plus timm\'s own, e.g. relu, gelu)')
    print('convert_to_mpc families:')
    for family in SUPPORTED_FAMILIES:
        print(f'  {family}')
    return 0


def _convert(args: argparse.Namespace) -> int:
    pattern = json.loads(args.pattern) if args.pattern.startswith('[') else args.pattern
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    for module in model.modules():  # compare against timm's explicit (unfused) attention
        if hasattr(module, 'fused_attn'):
            module.fused_attn = False
    size = model.pretrained_cfg['input_size']
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(images)
    model, report = convert_to_mpc(model, pattern, act_layer=args.act_layer, return_report=True)
    with torch.no_grad():
        after = model(images)
    print(report)
    agree = (before.argmax(-1) == after.argmax(-1)).float().mean().item()
    print(f'{args.model}: max |logit change| {(after - before).abs().max().item():.3g}, '
          f'top-1 agreement {agree:.0%} on {args.batch} random images')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-mpc', description=__doc__)
    parser.add_argument('--version', action='version', version=__version__)
    sub = parser.add_subparsers(dest='command', required=True)

    info = sub.add_parser('info', help='list the registered models, layer kinds and convertible families')
    info.set_defaults(func=_info)

    convert = sub.add_parser('convert', help='convert a timm model and show what changed')
    convert.add_argument('model', help='a timm model name, e.g. vit_tiny_patch16_224')
    convert.add_argument('--pattern', default='softmax',
                         help=f'one of {", ".join(ATTN_KINDS)}, search, or a JSON list of layer patterns')
    convert.add_argument('--act-layer', default=None, help='new MLP activation, e.g. quad_gelu or relu')
    convert.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained weights first')
    convert.add_argument('--batch', type=int, default=2, help='random images to compare outputs on')
    convert.set_defaults(func=_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f'timm-mpc {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

"""The ``timm-mpc`` command line."""
import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import timm
import torch
from timm.models import get_model_input_config

from . import __version__
from .command_args import model_kwargs, print_error
from .convert import convert_to_mpc
from .hub.commands import add_hub_commands
from .layers.attn_kinds import list_attn_kinds
from .layers.pattern_state import checkpoint_state
from .layers.register import ACT_LAYER_NAMES, attn_layer_names
from .pattern import parse_attn_pattern, parse_gelu_pattern
from .reader import read_model, support_table
from .secure.commands import add_secure_commands
from .secure.serving.commands import add_service_commands
from .training.commands import add_training_commands
from .utils import save_weights

__all__ = ['main']


def _info(args: argparse.Namespace) -> int:
    print(f'timm-mpc {__version__} (timm {timm.__version__}, torch {torch.__version__})')
    print('models:')
    for name in timm.list_models('mpcvit_*'):
        tags = timm.list_pretrained(f"{name}.*")
        print(f'  {name:14s} Hub tags: {", ".join(t.split(".", 1)[1] for t in tags) or "none (load a local file)"}')
    print('attention kinds (per head), or search:')
    for kind in list_attn_kinds():
        print(f'  {kind.name:14s} code {kind.code}, {kind.title} ({kind.paper})')
    print(f'timm attn_layer names: {", ".join(attn_layer_names())}')
    print(f'timm act_layer names: {", ".join(ACT_LAYER_NAMES)} (plus timm\'s own, e.g. relu, gelu)')
    print('families:')
    print(f'  {"family":15s} {"models":32s} {"converts":9s} runs securely')
    for row in support_table():
        print(f'  {row["family"]:15s} {row["models"]:32s} {row["converts"]:9s} {row["secure"]}')
    from .secure.engines import ENGINES
    print('MPC engines (--engine), protocols (--protocol, default first):')
    for engine in ENGINES.values():
        try:
            engine.check_installed()
            installed = 'installed'
        except ImportError:
            installed = f'not installed: {engine.requires[1]}'
        insecure = f'; {", ".join(engine.insecure_protocols)}: the owner deals, cost only' if engine.insecure_protocols else ''
        print(f'  {engine.name:14s} {", ".join(engine.protocols)}{insecure} ({installed})')
    return 0


def _convert(args: argparse.Namespace) -> int:
    output = None
    if args.output:  # checked before anything is built, so nothing is half-done on a bad path
        output = Path(args.output)
        if output.suffix != '.safetensors' or not output.parent.is_dir():
            raise ValueError(f'--output {args.output}: accepted is a .safetensors file in an existing folder')
    kwargs = model_kwargs(args)
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).eval()
    pattern = parse_attn_pattern(args.pattern, model)
    for _, module in read_model(model).attention:  # compare against timm's explicit (unfused) attention
        if hasattr(module, 'fused_attn'):
            module.fused_attn = False
    size = get_model_input_config(model)['input_size']
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(images)
    model, report = convert_to_mpc(model, pattern, act_layer=args.act_layer, gelu_pattern=parse_gelu_pattern(
        args.gelu_pattern), return_report=True)
    with torch.no_grad():
        after = model(images)
    print(report)
    agree = (before.argmax(-1) == after.argmax(-1)).float().mean().item()
    print(f'{args.model}: max |logit change| {(after - before).abs().max().item():.3g}, '
          f'top-1 agreement {agree:.0%} on {args.batch} random images')
    if output is not None:
        save_weights(checkpoint_state(model), output)
        again = [a for a in (f'--model-kwargs {shlex.quote(args.model_kwargs)}' if args.model_kwargs else '',
                             f'--act-layer {args.act_layer}' if args.act_layer else '',
                             f'--gelu-pattern {shlex.quote(args.gelu_pattern)}' if args.gelu_pattern else '') if a]
        print(f'wrote {output} (the converted model\'s weights and head pattern); run it with: timm-mpc predict '
              f'{args.model} --checkpoint {output} {" ".join(again)}'.rstrip())
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
                         help=f'one of {", ".join(k.name for k in list_attn_kinds())}, search, or a JSON list of layer patterns')
    convert.add_argument('--act-layer', default=None, help='new MLP activation, e.g. quad_gelu or relu')
    convert.add_argument('--gelu-pattern', default=None, help='MPCViT+ GeLU pattern: gelu, linear, or a JSON list')
    convert.add_argument('--model-kwargs', default=None, help='JSON keyword arguments for timm.create_model')
    convert.add_argument('--output', default=None,
                         help='write the converted weights (with the head pattern) to this .safetensors file, for '
                              'predict/bench/party --checkpoint')
    convert.add_argument('--pretrained', action='store_true', help='load the model\'s pretrained weights first')
    convert.add_argument('--batch', type=int, default=2, help='random images to compare outputs on')
    convert.set_defaults(func=_convert)

    add_secure_commands(sub)
    add_service_commands(sub)
    add_training_commands(sub)
    add_hub_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # how a measurement was made, for its record
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        print_error(args.command, e)
        from .secure.engines import exit_after_failure
        exit_after_failure(2)
        return 2


if __name__ == '__main__':
    sys.exit(main())

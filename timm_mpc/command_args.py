"""What every command of ``timm-mpc`` shares: the model a command names (its name, pattern and weights), whole
numbers as arguments, and how a failure reads."""
import argparse
import sys
from typing import Any, Dict

import torch

from .factory import create_mpc_model
from .layers.attn_kinds import list_attn_kinds
from .utils import parse_json

__all__ = ['add_model_args', 'model_kwargs', 'resolve_model', 'positive_int', 'print_error']


def add_model_args(p: argparse.ArgumentParser, required: bool = True, option: bool = False) -> None:
    help_ = 'mpcvit_tiny, mpcvit_small, or a timm ViT name (converted on the fly)'
    if option:
        p.add_argument('--model', default=None, help=help_)
    else:
        p.add_argument('model', nargs=None if required else '?', default='mpcvit_tiny', help=help_)
    p.add_argument('--pattern', default=None,
                   help=f'head pattern: a kind ({", ".join(k.name for k in list_attn_kinds())}), muNN (NN%% ReLU-Softmax, rest Scaling; '
                        f'default mu50 without a checkpoint) or a JSON list')
    p.add_argument('--gelu-pattern', default=None, help='MPCViT+ GeLU pattern: gelu, linear or a JSON list')
    p.add_argument('--act-layer', default=None, help='MLP activation, e.g. quad_gelu or relu')
    p.add_argument('--checkpoint', default=None, help='weights file (random weights without one or --pretrained)')
    p.add_argument('--pretrained', action='store_true',
                   help='the published weights: the default tag, or name one (mpcvit_tiny.fmnist_mu30_kd, '
                        'hf-hub:ORG/NAME, local-dir:PATH); offline, seed the Hub cache first (timm-mpc seed-cache)')
    p.add_argument('--model-kwargs', default=None, help='JSON keyword arguments for timm.create_model, '
                                                        'e.g. \'{"depth": 2}\'')


def model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    kwargs = parse_json(args.model_kwargs, '--model-kwargs') if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f'--model-kwargs must be a JSON object of keyword arguments, got {args.model_kwargs!r}')
    return kwargs


def resolve_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model a command names (see :func:`timm_mpc.factory.create_mpc_model`), in eval mode: random weights
    with the ``--pattern`` (default mu50) unless ``--checkpoint`` or ``--pretrained`` gives weights with theirs."""
    kwargs = model_kwargs(args)
    weights = args.pretrained or args.checkpoint
    try:
        model = create_mpc_model(args.model, pretrained=args.pretrained and not args.checkpoint,
                                 checkpoint=args.checkpoint, attn_pattern=args.pattern or (None if weights else 'mu50'),
                                 gelu_pattern=args.gelu_pattern, act_layer=args.act_layer, **kwargs)
    except TypeError as e:
        raise ValueError(f'{args.model} cannot be built with these arguments (--model-kwargs '
                         f'{args.model_kwargs or "{}"}): {e}') from None
    return model.eval()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number of at least 1, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number of at least 1, got {value}')
    return value


def print_error(command: str, error: object) -> None:
    print(f'timm-mpc {command}: error: {error}', file=sys.stderr, flush=True)

"""``timm-mpc publish | seed-cache``: the Hub side of the command line."""
import argparse
import os
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from torch import nn

from ..factory import create_mpc_model
from ..utils import parse_json, read_json

__all__ = ['add_hub_commands', 'training_summary']


def _short(path: Optional[str]) -> Optional[str]:
    return '/'.join(Path(path).parts[-2:]) if path else None


def training_summary(run: Dict[str, Any], source: str = 'run.json') -> Dict[str, Any]:
    """What a card says about how a checkpoint was trained, from its run's ``run.json``."""
    try:
        return _training_summary(run)
    except (KeyError, TypeError) as e:
        raise ValueError(f'{source} is not the run.json of a timm-mpc training run (its run, mode, config, final and '
                         f'history entries are read; {type(e).__name__}: {e})') from None


def _training_summary(run: Dict[str, Any]) -> Dict[str, Any]:
    cfg, final = run['config'], run['final']
    return dict(
        mode=run['mode'], epochs=final['epochs'], dataset=cfg['dataset'], train_subset=cfg.get('train_subset'),
        init_from=_short(cfg.get('init_from')), teacher=_short(cfg.get('teacher')), opt=cfg['opt'], lr=cfg['lr'],
        sched=cfg['sched'], batch_size=cfg['batch_size'] * run.get('world_size', 1),
        precision=f'{cfg["amp_dtype"]} autocast' if cfg['amp'] else 'float32', device=cfg['device'],
        train_s=sum(h.get('epoch_s', 0.0) for h in run['history']), final_top1=final['test_top1'])


def _load_source(args: argparse.Namespace) -> nn.Module:
    """The model to publish: a weights file of ``--model``, a published folder, or a timm/Hub model name."""
    src = args.source
    if os.path.isdir(src):
        return timm.create_model(f'local-dir:{src}', pretrained=True)
    if not os.path.isfile(src):
        return timm.create_model(src, pretrained=True)
    kwargs = parse_json(args.model_kwargs, '--model-kwargs') if args.model_kwargs else {}
    return create_mpc_model(args.model, checkpoint=src, act_layer=args.act_layer, **kwargs)


def _publish(args: argparse.Namespace) -> int:
    from .publish import publish
    results: Dict[str, Any] = {}  # the small files first: a malformed one stops before the model loads
    kept = Path(args.source) / 'results.json'
    # a published folder keeps its figures; --results replaces those it measured again (a training record stays)
    for results_file in (str(kept) if kept.is_file() else None, args.results):
        if results_file:
            measured = read_json(results_file, 'results file')
            results.update({k: measured[k] for k in ('plain', 'secure', 'machine', 'training') if k in measured})
    if args.run:
        results['training'] = training_summary(read_json(args.run, '--run file'), args.run)
    model = _load_source(args).eval()
    where = publish(model, args.repo, results=results, dry_run_dir=args.dry_run, private=args.private)
    print(f'{args.repo}: {"wrote" if args.dry_run else "uploaded"} {where}')
    return 0


def _seed_cache(args: argparse.Namespace) -> int:
    from .cache import seed_hub_cache
    for folder in args.folders:
        print(f'{folder} -> {seed_hub_cache(folder, cache_dir=args.cache_dir)}')
    return 0


def add_hub_commands(sub: Any) -> None:
    """Add the Hub subcommands to the ``timm-mpc`` parser."""
    pub = sub.add_parser('publish', help='write a model\'s Hub repository (config, safetensors, card) and upload it')
    pub.add_argument('source', help='a weights file of --model, a published folder, or a model name '
                                    '(mpcvit_tiny.TAG, hf-hub:ORG/NAME)')
    pub.add_argument('--repo', required=True, help='ORG/NAME on the Hub; timm names them ARCHITECTURE.TAG')
    pub.add_argument('--dry-run', default=None, metavar='DIR', help='write the repository folder here, upload nothing')
    pub.add_argument('--model', default='mpcvit_tiny', help='architecture of a weights file: mpcvit_* or a timm ViT '
                                                            '(converted with convert_to_mpc)')
    pub.add_argument('--model-kwargs', default=None, help='JSON keyword arguments for timm.create_model')
    pub.add_argument('--act-layer', default=None, help='the converted ViT\'s MLP activation, e.g. quad_gelu')
    pub.add_argument('--results', default=None, help='measured figures for the card: timm-mpc eval --json output '
                                                     '(default for a published folder: its results.json)')
    pub.add_argument('--run', default=None, help='the run.json of the training run, for the card\'s training section')
    pub.add_argument('--private', action='store_true', help='create the repository private')
    pub.set_defaults(func=_publish)

    seed = sub.add_parser('seed-cache', help='put published folders into the Hugging Face cache, for offline loading')
    seed.add_argument('folders', nargs='+', help='folders laid out ORG/NAME (e.g. checkpoints/timm-mpc/*)')
    seed.add_argument('--cache-dir', default=None, help='the Hub cache (default: HF_HUB_CACHE)')
    seed.set_defaults(func=_seed_cache)

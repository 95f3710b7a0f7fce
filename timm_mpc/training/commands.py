"""``timm-mpc train | search | retrain | eval | pareto | curves``: the training side of the command line."""
import argparse
import json
import os
import platform
import shlex
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any, Dict

import timm
import torch

from ..factory import create_mpc_model
from ..pattern import parse_attn_pattern, parse_gelu_pattern
from ..utils import parse_json
from .config import RunConfig

__all__ = ['add_training_commands']

_DEFAULTS = RunConfig()


def _config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    values: Dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    values['model_kwargs'] = parse_json(args.model_kwargs, '--model-kwargs') if args.model_kwargs else {}
    if values.get('auto_augment') == 'none':
        values['auto_augment'] = None
    if 'scale' in values:
        values['scale'] = tuple(values['scale'])
    values.update(overrides)
    return RunConfig.from_dict(values)


def _train(args: argparse.Namespace) -> int:
    from .engine import train_model
    cfg = _config(args, attn_pattern=parse_attn_pattern(args.attn_pattern, what='--attn-pattern'),
                  gelu_pattern=parse_gelu_pattern(args.gelu_pattern))
    record = train_model(cfg, 'train')
    return _report(record, cfg)


def _search(args: argparse.Namespace) -> int:
    from ..cost import model_cost_table
    from ..search.export import export_patterns
    from ..cost.pricing import model_estimate, priced_by_table
    from .engine import train_model
    cfg = _config(args, attn_pattern='search', gelu_pattern='search' if args.search_gelu else None)
    if args.search_gelu and cfg.gelu_keep is None:
        raise ValueError('--search-gelu needs --gelu-keep (the fraction of GeLU tokens to keep when binarizing)')

    def finish(model: torch.nn.Module, record: Dict[str, Any], out: Path) -> None:
        settings = cfg.cost_settings()
        table = model_cost_table(model, settings=settings) if cfg.budget_s and priced_by_table(model) else None
        record['search'] = export_patterns(model, out, cfg.mu, cfg.budget_s, cfg.network, cfg.gelu_keep, table,
                                           estimate=partial(model_estimate, settings=settings))
        for name, p in record['search']['patterns'].items():
            lat = p['secure_estimate']['latency_s']
            print(f'{name}: {p["head_kinds"]}, estimated {lat["lan"]:.2f} s LAN / {lat["wan"]:.1f} s WAN '
                  f'-> {out / p["file"]}')

    return _report(train_model(cfg, 'search', on_finish=finish), cfg)


def _retrain(args: argparse.Namespace) -> int:
    from .engine import train_model
    cfg = _config(args, init_from=args.searched, pattern_from_init=True, reinit_weights=args.from_scratch,
                  attn_pattern=None)
    return _report(train_model(cfg, 'retrain'), cfg)


def _report(record: Dict[str, Any], cfg: RunConfig) -> int:
    if 'final' not in record:  # a secondary process of a distributed run: the primary reports
        return 0
    final, model = record['final'], record.get('model') or {}
    line = f'{cfg.output}: test top-1 {final.get("test_top1", float("nan")):.2f}% after {final.get("epochs")} epochs'
    if 'secure_estimate' in model:
        lat = model['secure_estimate']['latency_s']
        line += f', heads {model["head_kinds"]}, estimated {lat["lan"]:.2f} s LAN / {lat["wan"]:.1f} s WAN'
    print(line)
    return 0


def _first_images(loader: torch.utils.data.DataLoader, count: int) -> Any:
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
        if sum(len(t) for t in labels) >= count:
            break
    return torch.cat(images)[:count], torch.cat(labels)[:count]


def _secure_eval(model: torch.nn.Module, loader: torch.utils.data.DataLoader, calibration_loader: Any,
                 args: argparse.Namespace) -> Dict[str, Any]:
    """Accuracy under MPC on the first test images, with the owner calibrating on the first training images,
    and the secure cost of one image against the all-Softmax, exact-GeLU model (real two-party runs, a dealer
    process outside both parties)."""
    from ..secure.bench import baseline_of, run_bench, secure_accuracy
    from ..secure.settings import SecureSettings
    images, labels = _first_images(loader, args.secure_images)
    calibration, _ = _first_images(calibration_loader, args.calibration_images)
    settings = SecureSettings()
    result = secure_accuracy(model, images, labels, settings, batch=args.secure_batch, calibration_images=calibration)
    report = run_bench({'baseline': baseline_of(model), 'model': model}, images[:1], settings,
                       calibration_images=calibration)
    keep = ('heads', 'rounds', 'bytes', 'wall_s', 'compute_s', 'dealer', 'latency_s', 'ratio_to_baseline')
    result['cost'] = dict(batch=report['batch'], networks=report['networks'],
                          **{name: {k: e[k] for k in keep} for name, e in report['results'].items()})
    result['settings'] = report['settings']
    result['calibration_images'] = int(calibration.shape[0])
    return result


def _machine() -> str:
    return f'{platform.machine()} Linux, {os.cpu_count()} CPU cores, torch {torch.__version__}, timm {timm.__version__}'


def _eval(args: argparse.Namespace) -> int:
    from .data import build_dataset, build_loader, model_data_config
    from .engine import evaluate, model_summary
    kwargs = parse_json(args.model_kwargs, '--model-kwargs') if args.model_kwargs else {}
    if args.img_size:
        kwargs['img_size'] = args.img_size
    model = create_mpc_model(args.model, pretrained=not args.checkpoint, checkpoint=args.checkpoint, **kwargs).eval()
    source = args.checkpoint or args.model
    if not args.no_latency:  # the estimate comes after the evaluation: refuse a model it cannot price now
        from ..cost.pricing import check_priceable
        check_priceable(model, RunConfig().cost_settings(), 'evaluate it with --no-latency')
    data_config = model_data_config(model)
    ds = build_dataset(args.dataset, 'test', args.data_dir, args.download, data_config['input_size'][0],
                       args.test_subset)
    loader = build_loader(ds, data_config, args.batch_size, False, args.workers)
    metrics = evaluate(model, loader, torch.device('cpu'))
    cfg = RunConfig(model=model.pretrained_cfg['architecture'], estimate_latency=not args.no_latency)
    argv = list(getattr(args, 'argv', sys.argv[1:]))
    if '--json' in argv:  # where the figures were written is not part of how they were measured
        del argv[argv.index('--json'):argv.index('--json') + 2]
    command = 'timm-mpc ' + ' '.join(shlex.quote(a) for a in argv)
    plain = dict(dataset=args.dataset, command=command, **metrics)
    print(f'{source}: top-1 {metrics["top1"]:.2f}%, top-5 {metrics["top5"]:.2f}% on '
          f'{metrics["images"]} {args.dataset} test images')
    result: Dict[str, Any] = dict(source=source, plain=plain, model=model_summary(model, cfg), machine=_machine())
    if args.secure_images:
        train = build_dataset(args.dataset, 'train', args.data_dir, args.download, data_config['input_size'][0],
                              args.calibration_images)
        result['secure'] = secure = _secure_eval(model, loader, build_loader(train, data_config, args.batch_size, False,
                                                                             args.workers), args)
        cost = secure['cost']
        print(f'under MPC: top-1 {secure["top1"]:.2f}% on the first {secure["images"]} images (plain text '
              f'{secure["plain_top1"]:.2f}%, agreement {secure["agreement"]:.1f}%); one image: '
              f'{cost["model"]["rounds"]} rounds, {cost["model"]["bytes"] / 1e6:.0f} MB, LAN '
              f'{cost["model"]["latency_s"]["lan"]:.2f} s vs {cost["baseline"]["latency_s"]["lan"]:.2f} s all-Softmax')
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _curves(args: argparse.Namespace) -> int:
    from .curves import load_histories, plot_curves
    runs = load_histories(args.runs)
    plot_curves(runs, args.out, args.title)
    for run in runs:
        last = run['history'][-1]
        print(f'{run["name"]}: {len(run["history"])} epochs, last test top-1 {last["test_top1"]:.2f}%')
    print(f'wrote {args.out}')
    return 0


def _pareto(args: argparse.Namespace) -> int:
    from .pareto import load_runs, pareto_table, plot_pareto
    rows = load_runs(args.runs, reprice=args.reprice)
    table = pareto_table(rows)
    print(table)
    plot_pareto(rows, args.out, args.title)
    print(f'wrote {args.out}')
    if args.table:
        Path(args.table).write_text(table + '\n')
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--dataset', default='fashion_mnist',
                   help='fashion_mnist (Debian dataset-fashion-mnist or torchvision), cifar10, cifar100, '
                        'tiny_imagenet, or folder (DATA_DIR/train and DATA_DIR/val)')
    p.add_argument('--data-dir', default=None, help='dataset root')
    p.add_argument('--download', action='store_true', help='let torchvision download a missing dataset')
    p.add_argument('--test-subset', type=int, default=None, help='evaluate on the first N test images only')
    p.add_argument('--workers', type=int, default=_DEFAULTS.workers, help='data loader processes')
    p.add_argument('--model-kwargs', default=None, help='JSON keyword arguments for timm.create_model')
    p.add_argument('--img-size', type=int, default=None, help='build the model at this input size (timm resamples '
                   'a pretrained position embedding)')


def _add_run_args(p: argparse.ArgumentParser, epochs: int) -> None:
    d = _DEFAULTS
    p.add_argument('--output', required=True, help='run folder (run.json, model.safetensors, checkpoints)')
    p.add_argument('--model', default=d.model, help='mpcvit_tiny, mpcvit_small (or a tag, e.g. mpcvit_tiny.cifar10 '
                                                    'for CIFAR mean/std), or any timm model convert_to_mpc supports '
                                                    '(converted, its data config timm\'s)')
    p.add_argument('--pretrained', action='store_true', help='start from the model\'s pretrained timm weights; a '
                   'retraining of a converted timm model then distils from the pretrained original unless --no-kd')
    _add_data_args(p)
    p.add_argument('--train-subset', type=int, default=None, help='train on the first N images only')
    p.add_argument('--epochs', type=int, default=epochs)
    p.add_argument('--batch-size', type=int, default=d.batch_size)
    p.add_argument('--opt', default=d.opt, help='any timm optimizer name')
    p.add_argument('--lr', type=float, default=d.lr)
    p.add_argument('--weight-decay', type=float, default=d.weight_decay)
    p.add_argument('--sched', default=d.sched, help='any timm scheduler name')
    p.add_argument('--warmup-epochs', type=int, default=d.warmup_epochs)
    p.add_argument('--min-lr', type=float, default=d.min_lr)
    p.add_argument('--clip-grad', type=float, default=None)
    p.add_argument('--mixup', type=float, default=d.mixup, help='Mixup alpha (0 disables)')
    p.add_argument('--cutmix', type=float, default=d.cutmix, help='CutMix alpha (0 disables)')
    p.add_argument('--smoothing', type=float, default=d.smoothing, help='label smoothing')
    p.add_argument('--auto-augment', default=d.auto_augment, help='timm auto-augment string; "none" disables')
    p.add_argument('--scale', type=float, nargs=2, default=list(d.scale), help='random-resized-crop scale range')
    p.add_argument('--hflip', type=float, default=d.hflip)
    p.add_argument('--re-prob', type=float, default=d.re_prob, help='random erasing probability')
    p.add_argument('--drop-path', type=float, default=d.drop_path)
    p.add_argument('--device', default=d.device, help='cpu or cuda (torchrun for several GPUs)')
    p.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 by default; fast on CPUs with AVX512-BF16)')
    p.add_argument('--amp-dtype', choices=['bfloat16', 'float16'], default=d.amp_dtype)
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--no-resume', dest='resume', action='store_false', help='start over even if the folder has a run')
    p.add_argument('--no-latency', dest='estimate_latency', action='store_false',
                   help='skip the secure-latency estimate (it measures a per-kind cost table once, cached)')
    p.add_argument('--engine', default=d.engine, help='MPC engine whose measured costs price the latency estimates, '
                   'budgets and cost-weighted penalty: crypten (default) or spu')
    p.add_argument('--protocol', default=None, help='that engine\'s protocol (default: its first; spu: cheetah)')
    p.add_argument('--teacher', default=None, help='teacher weights: distil with token-level KD (a converted timm '
                   'model\'s teacher is its unconverted original with these weights; mpcvit_*: an all-Softmax run)')
    p.add_argument('--no-kd', action='store_true', help='no distillation, even from a pretrained original')
    p.add_argument('--kd-alpha', type=float, default=d.kd_alpha, help='weight of the token MSE term')


def add_training_commands(sub: Any) -> None:
    """Add the training subcommands to the ``timm-mpc`` parser."""
    train = sub.add_parser('train', help='train a model with a fixed pattern (the all-Softmax teacher by default)')
    _add_run_args(train, epochs=300)
    train.add_argument('--attn-pattern', default='softmax', help='a kind for all heads or a JSON list')
    train.add_argument('--gelu-pattern', default=None, help='MPCViT+ GeLU pattern')
    train.add_argument('--init-from', default=None, help='start from these weights (the pattern stays)')
    train.set_defaults(func=_train)

    search = sub.add_parser('search', help='MPC-aware search (learnable α per head), then binarize')
    _add_run_args(search, epochs=300)
    search.add_argument('--init-from', default=None, help='start the supernet from these weights (e.g. the teacher)')
    search.add_argument('--lam', type=float, default=_DEFAULTS.lam, help='λ of the α penalty')
    search.add_argument('--cost-weighted', action='store_true',
                        help='weight each head\'s penalty by the secure latency it saves (the per-kind cost table, '
                             'or dry runs for other families)')
    search.add_argument('--network', choices=['lan', 'wan'], default='lan', help='network for costs and budgets')
    search.add_argument('--mu', type=float, nargs='*', default=[0.5], help='fractions of ReLU-Softmax heads to keep')
    search.add_argument('--budget-s', type=float, nargs='*', default=[], help='latency budgets in seconds')
    search.add_argument('--search-gelu', action='store_true', help='MPCViT+: also search β per token')
    search.add_argument('--lam-beta', type=float, default=1e-5, help='λ of the β penalty')
    search.add_argument('--gelu-keep', type=float, default=None, help='fraction of GeLU tokens kept at binarization')
    search.set_defaults(func=_search)

    retrain = sub.add_parser('retrain', help='retrain a binarized pattern, with KD from a teacher')
    _add_run_args(retrain, epochs=600)
    retrain.add_argument('--searched', required=True, help='a binarized checkpoint from search (e.g. SEARCH/mu50.safetensors)')
    retrain.add_argument('--from-scratch', action='store_true', help='keep the pattern but start from random weights')
    retrain.set_defaults(func=_retrain)

    ev = sub.add_parser('eval', help='test accuracy of a checkpoint, in plain text and (optionally) under MPC')
    ev.add_argument('--checkpoint', default=None, help='weights file (model.safetensors of a run, or any checkpoint); '
                                                       'without one, --model\'s pretrained weights')
    ev.add_argument('--model', default='mpcvit_tiny', help='a model name, a tag (mpcvit_tiny.fmnist_mu50_kd), '
                                                           'hf-hub:ORG/NAME or local-dir:PATH')
    _add_data_args(ev)
    ev.add_argument('--batch-size', type=int, default=256)
    ev.add_argument('--no-latency', action='store_true', help='skip the secure-latency estimate')
    ev.add_argument('--secure-images', type=int, default=0,
                    help='also run two-party secure inference on the first N test images (accuracy under MPC) and '
                         'measure one image\'s secure cost against the all-Softmax model')
    ev.add_argument('--secure-batch', type=int, default=32, help='images per secure run')
    ev.add_argument('--calibration-images', type=int, default=64,
                    help='the owner calibrates the secure approximations on the first N training images')
    ev.add_argument('--json', default=None, help='write the figures to this JSON file (the input of timm-mpc publish '
                                                 '--results)')
    ev.set_defaults(func=_eval)

    curves = sub.add_parser('curves', help='plot learning curves (test top-1 and training loss per epoch)')
    curves.add_argument('runs', nargs='+', help='run folders or run.json files')
    curves.add_argument('--out', default='curves.png', help='PNG to write')
    curves.add_argument('--title', default='Learning curves')
    curves.set_defaults(func=_curves)

    pareto = sub.add_parser('pareto', help='plot accuracy against estimated secure latency (LAN and WAN)')
    pareto.add_argument('runs', nargs='+', help='run folders or run.json files')
    pareto.add_argument('--out', default='pareto.png', help='PNG to write')
    pareto.add_argument('--table', default=None, help='also write the Markdown table here')
    pareto.add_argument('--title', default='Accuracy against estimated secure latency')
    pareto.add_argument('--reprice', action='store_true', help='price every run\'s pattern now with this machine\'s '
                        'cost table instead of the estimate recorded with it (runs recorded on different machines)')
    pareto.set_defaults(func=_pareto)

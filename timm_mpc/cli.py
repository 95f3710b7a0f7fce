"""The ``timm-mpc`` command line."""
import argparse
import json
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.models import get_model_input_config

from . import __version__
from .convert import convert_to_mpc
from .data import calibration_examples, example_images
from .factory import create_mpc_model
from .hub.commands import add_hub_commands
from .layers.attn_kinds import list_attn_kinds
from .layers.register import ACT_LAYER_NAMES, attn_layer_names
from .layers.pattern_state import checkpoint_state
from .pattern import count_head_kinds, parse_attn_pattern, parse_gelu_pattern
from .reader import read_model, support_table
from .training.commands import add_training_commands
from .utils import parse_json, save_weights

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
    kwargs = _model_kwargs(args)
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


def _model_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    kwargs = parse_json(args.model_kwargs, '--model-kwargs') if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f'--model-kwargs must be a JSON object of keyword arguments, got {args.model_kwargs!r}')
    return kwargs


def resolve_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model a command names (see :func:`timm_mpc.factory.create_mpc_model`), in eval mode: random weights
    with the ``--pattern`` (default mu50) unless ``--checkpoint`` or ``--pretrained`` gives weights with theirs."""
    kwargs = _model_kwargs(args)
    weights = args.pretrained or args.checkpoint
    try:
        model = create_mpc_model(args.model, pretrained=args.pretrained and not args.checkpoint,
                                 checkpoint=args.checkpoint, attn_pattern=args.pattern or (None if weights else 'mu50'),
                                 gelu_pattern=args.gelu_pattern, act_layer=args.act_layer, **kwargs)
    except TypeError as e:
        raise ValueError(f'{args.model} cannot be built with these arguments (--model-kwargs '
                         f'{args.model_kwargs or "{}"}): {e}') from None
    return model.eval()


def _settings(args: argparse.Namespace) -> Any:
    from .secure.settings import SecureSettings
    base = SecureSettings.crypten_defaults if args.crypten_defaults else SecureSettings
    # an insecure provider or protocol warns when it runs
    return base(provider=args.provider, timeout_s=args.timeout, engine=args.engine, protocol=args.protocol)


def _networks(args: argparse.Namespace) -> Dict[str, Any]:
    from .cost import NETWORKS, NetworkSetting
    nets = dict(NETWORKS)
    if args.rtt_ms is not None or args.bandwidth_mbps is not None:
        n = nets[args.network]
        nets[args.network] = NetworkSetting(
            n.name, args.rtt_ms / 1e3 if args.rtt_ms is not None else n.rtt_s,
            args.bandwidth_mbps * 1e6 if args.bandwidth_mbps is not None else n.bandwidth_bps)
    return nets


def _load_images(path: Optional[str], batch: Optional[int] = None, what: str = '--images',
                 model: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Images from a ``.pt`` file (a tensor, or a dict with an ``images`` tensor), or the shipped Fashion-MNIST
    examples (as ``model``'s input: its size and normalization); the first ``batch`` of them. Checked as a finite
    float ``(B, C, H, W)`` tensor, returned as float32."""
    from .secure.plan import check_image_tensor
    if path:
        try:
            images = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise ValueError(f'{what} {path}: no such file') from None
        except Exception as e:  # torch.load raises many kinds (pickle, zip, weights_only refusals)
            raise ValueError(f'{what} {path} is not a tensor file written by torch.save '
                             f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
        if isinstance(images, dict) and 'images' in images:
            images = images['images']
        if not isinstance(images, torch.Tensor):
            found = f'a dict with keys {sorted(map(str, images))}' if isinstance(images, dict) else type(images).__name__
            raise ValueError(f'{what} {path} holds {found}; accepted: a (B, C, H, W) float tensor, or a dict with '
                             f'one under "images"')
    elif model is not None:
        images = calibration_examples(model)
    else:
        images, _ = example_images()
    check_image_tensor(images, f'{what} {path or "(the shipped examples)"}')
    images = images.float()  # float64 or float16 files: the model's and the parties' dtype, before anything runs
    return images[:batch] if batch else images


def _predict(args: argparse.Namespace) -> int:
    from .secure import secure_predict
    from .secure.bench import compare_logits, format_profile

    from .secure.plan import check_images

    settings = _settings(args)
    networks = _networks(args)  # checked before anything runs
    model = resolve_model(args)
    images = _load_images(args.images, args.batch, model=model)
    print(f'{args.model}: heads {count_head_kinds(model)}; {images.shape[0]} images; owner and client as two local '
          f'processes, {_protocol_line(settings)}')
    result = secure_predict(model, images, settings=settings, calibration_images=_calibration(args),
                            clamp_images=args.clamp_images, return_result=True, batch_size=args.batch_size,
                            max_memory=args.max_memory)
    with torch.no_grad():
        plain = model(check_images(result.plan, images, clamp=args.clamp_images))
    profile = result.profile.to_dict(networks)
    print(format_profile(profile, args.network))
    acc = compare_logits(result.logits, plain)
    print(f'secure vs plain text: top-1 agreement {acc["top1_agreement"]:.0%}, max |logit error| '
          f'{acc["max_abs_error"]:.2g}')
    print('client\'s predictions:', result.logits.argmax(-1).tolist())
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(profile=profile, accuracy=acc, logits=result.logits.tolist()), f, indent=1)
    return 0


def _protocol_line(settings: Any) -> str:
    """How the run makes its multiplication triples, in words."""
    if settings.engine == 'crypten':
        dealer = 'a dealer process' if settings.dealer else 'the owner as dealer (insecure)'
        return f'triples from {dealer} (CrypTen, {settings.provider})'
    how = 'no dealer' if settings.secure else 'the owner as dealer (insecure)'
    return f'SPU {settings.protocol.upper()} ({how})'


def _bench(args: argparse.Namespace) -> int:
    from .secure.bench import baseline_of, format_comparison, format_profile, run_bench, write_json

    settings = _settings(args)
    networks = _networks(args)  # checked before anything runs
    model = resolve_model(args)
    images = _load_images(args.images, args.batch, model=model)
    configs = {'baseline': baseline_of(model), 'model': model}
    report = run_bench(configs, images, settings, networks, check=args.check,
                       calibration_images=_calibration(args), clamp_images=args.clamp_images)
    report['model'] = args.model
    print(format_profile(report['results']['model']['profile'], args.network))
    print(format_comparison(report, args.network))
    if args.json:
        write_json(report, args.json)
        print(f'wrote {args.json}')
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


def _calibration(args: argparse.Namespace) -> Optional[torch.Tensor]:
    """The owner's ``--calibration-images`` (default None: the shipped examples at the model's input size)."""
    if not args.calibration_images:
        return None
    return _load_images(args.calibration_images, what='--calibration-images')


def _on_loopback(rendezvous: str) -> bool:
    """The parties meet on this machine: they share its cores."""
    host = rendezvous.split('://', 1)[-1].rsplit(':', 1)[0]
    return host in ('localhost', '::1', '[::1]') or host.startswith('127.')


def _party(args: argparse.Namespace) -> int:
    from .secure.admission import parse_rendezvous, read_secret
    from .secure.bench import format_profile
    from .secure.engines import get_engine
    from .secure.memory import available_memory
    from .secure.protocol import OwnerLimits
    from .secure.crypten.party import run_dealer
    from .secure.plan import build_secure_plan

    settings = _settings(args)
    networks = _networks(args)  # checked before anything runs
    parse_rendezvous(args.rendezvous)
    secret = read_secret(args.secret_file)
    if not settings.secure:
        flags = f'--provider {settings.provider}' if settings.engine == 'crypten' else \
            f'--engine {settings.engine} --protocol {settings.protocol}'
        raise ValueError(f'timm-mpc party runs real parties, so it refuses {flags} (the owner would deal its own '
                         f'triples and could open the client\'s data); use CrypTen with --provider TTP and a dealer '
                         f'(rank 2), or --engine spu --protocol cheetah')
    if args.client_address and settings.engine != 'spu':
        raise ValueError('--client-address is for --engine spu (CrypTen parties meet at the rendezvous only)')
    engine = get_engine(settings.engine).load()
    extra = dict(client_address=args.client_address) if settings.engine == 'spu' else {}
    # what ends a party from a watchdog thread (the other party not met, or lost) reads as the command's errors do
    extra['on_timeout'] = partial(_print_error, 'party')
    torch.set_num_threads(args.threads or (1 if _on_loopback(args.rendezvous) else torch.get_num_threads()))
    if args.rank == 2 and not settings.dealer:
        raise ValueError(f'engine {settings.engine} with protocol {settings.protocol} has no dealer: run ranks 0 and 1 only')
    if args.rank == 2:
        print(f'dealer: serving multiplication triples at {args.rendezvous}', flush=True)
        run_dealer(args.rendezvous, settings, secret, on_timeout=extra['on_timeout'])
        print('dealer: done', flush=True)
        return 0
    if args.rank == 0:
        if not args.model:
            raise ValueError('the owner (rank 0) needs --model (and usually --checkpoint or --pretrained)')
        calibration = _calibration(args)
        model = resolve_model(args)
        plan = build_secure_plan(model, settings, calibration)
        state = plan.owner_weights(model)
        print(f'owner: {args.model}, heads {count_head_kinds(model)}; waiting for the client'
              f'{" and the dealer" if settings.dealer else ""} at {args.rendezvous} ({_protocol_line(settings)})',
              flush=True)
        limits = OwnerLimits(args.max_batch_size, args.max_images, args.max_memory or available_memory())
        result = engine.run_owner(args.rendezvous, plan, state, settings, secret, log=_log, limits=limits, **extra)
        print(f'owner: done; {result.profile.rounds} rounds, {result.profile.bytes / 1e6:.1f} MB, '
              f'{result.profile.wall_s:.2f} s; the owner sent its share of the logits to the client and holds no '
              f'logit itself')
        return 0
    images = _load_images(args.images, args.batch)
    print(f'client: {images.shape[0]} images; meeting the owner at {args.rendezvous}', flush=True)
    result = engine.run_client(args.rendezvous, images, settings, secret, log=_log, clamp=args.clamp_images,
                               batch_size=args.batch_size, **extra)
    profile = result.profile.to_dict(networks)
    print(format_profile(profile, args.network))
    print('client: predicted classes', result.logits.argmax(-1).tolist())
    if result.implausible:
        print(f'client: images {result.implausible} got logits beyond the plan\'s bound ({result.plan.logit_bound:g}): '
              f'a failed truncation (about one image in a thousand); run them again', file=sys.stderr)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(profile=profile, logits=result.logits.tolist()), f, indent=1)
    return 0


def _secret(args: argparse.Namespace) -> int:
    from .secure.admission import write_secret
    path = write_secret(args.file)
    print(f'wrote a new secret to {path}: give it to the owner, the client and the dealer over a channel you trust '
          f'(each runs timm-mpc party --secret-file {path.name})')
    return 0


def _add_model_args(p: argparse.ArgumentParser, required: bool = True, option: bool = False) -> None:
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number of at least 1, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number of at least 1, got {value}')
    return value


def _add_batch_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--batch-size', type=_positive_int, default=None,
                   help='client: run the images this many at a time in one session (the weights are shared once); '
                        'default: all at once')


def _memory_size(text: str) -> int:
    from .secure.memory import parse_memory
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_secure_args(p: argparse.ArgumentParser) -> None:
    from .secure.engines import DEFAULT_ENGINE, ENGINES
    from .secure.settings import PROVIDERS
    p.add_argument('--batch', type=_positive_int, default=None,
                   help='number of images (default: all given; 4 for predict)')
    p.add_argument('--images', default=None, help='.pt file with a (B, C, H, W) tensor of images normalized with '
                                                  'the model\'s mean and std; default: 8 shipped Fashion-MNIST test images')
    p.add_argument('--clamp-images', action='store_true',
                   help='clamp image values outside the model\'s input range (pixels in [0, 1], normalized) '
                        'instead of refusing the images')
    p.add_argument('--calibration-images', default=None,
                   help='owner: .pt images for the plain-text range pass (default: the shipped examples)')
    p.add_argument('--provider', choices=PROVIDERS, default='TTP',
                   help='multiplication triples from a dealer process that is neither party (TTP, default), or '
                        'from the model owner itself (TFP_INSECURE: the owner can open the client\'s data; '
                        'cost measurements only)')
    p.add_argument('--engine', choices=list(ENGINES), default=DEFAULT_ENGINE,
                   help='MPC engine: crypten (default) or spu (SecretFlow\'s, the paper\'s; pip install -e ".[spu]")')
    p.add_argument('--protocol', default=None,
                   help='the engine\'s protocol: for spu cheetah (default; no dealer) or semi2k (the owner deals: cost '
                        'only); crypten has one')
    p.add_argument('--timeout', type=float, default=120.0, help='seconds to wait for the other party')
    p.add_argument('--network', choices=['lan', 'wan'], default='lan', help='network for the latency estimate')
    p.add_argument('--rtt-ms', type=float, default=None, help='override the network\'s round-trip time')
    p.add_argument('--bandwidth-mbps', type=float, default=None, help='override the network\'s bandwidth')
    p.add_argument('--crypten-defaults', action='store_true', help='CrypTen\'s default approximations')
    p.add_argument('--json', default=None, help='write the figures to this JSON file')


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

    predict = sub.add_parser('predict', help='two-party secure prediction on local processes, with its costs')
    _add_model_args(predict, required=False)
    _add_secure_args(predict)
    _add_batch_size_arg(predict)
    predict.add_argument('--max-memory', type=_memory_size, default=None,
                         help='bound on the peak memory of the processes together, e.g. 6GiB: without --batch-size, '
                              'the largest batches that fit it (predicted by a dry run, CrypTen only)')
    predict.set_defaults(func=_predict, batch=4)

    bench = sub.add_parser('bench', help='secure cost against the all-Softmax, exact-GeLU baseline')
    _add_model_args(bench)
    _add_secure_args(bench)
    bench.add_argument('--check', action='store_true', help='also compare secure with plain-text logits')
    bench.set_defaults(func=_bench)

    party = sub.add_parser('party', help='run one party of a secure prediction (one per host)')
    party.add_argument('--rank', type=int, choices=[0, 1, 2], required=True,
                       help='0: model owner, 1: client, 2: dealer of multiplication triples (on a host that is '
                            'neither party\'s)')
    party.add_argument('--world-size', type=int, choices=[2], default=2, help='number of parties (two)')
    party.add_argument('--rendezvous', required=True,
                       help='tcp://HOST:PORT where the owner (rank 0) listens, on that address only')
    party.add_argument('--secret-file', required=True,
                       help='the run\'s secret (`timm-mpc secret FILE` makes one), the same file for every party: '
                            'each proves it holds it before anything is shared')
    party.add_argument('--threads', type=_positive_int, default=None,
                       help='torch threads of this party (default: 1 when the rendezvous is on loopback, as the '
                            'parties then share the cores, as in predict; else all of them)')
    party.add_argument('--client-address', default=None,
                       help='--engine spu: HOST:PORT where the client (rank 1) listens (default: the rendezvous host, '
                            'the next port)')
    _add_model_args(party, option=True)
    _add_secure_args(party)
    _add_batch_size_arg(party)
    party.add_argument('--max-batch-size', type=_positive_int, default=32,
                       help='owner: the largest batch a client may announce (default 32), refused before any work')
    party.add_argument('--max-images', type=_positive_int, default=1024,
                       help='owner: the most images a client may announce for one run (default 1024)')
    party.add_argument('--max-memory', type=_memory_size, default=None,
                       help='owner: bound on the predicted memory of the largest batch\'s dry run, e.g. 8GiB '
                            '(default: this machine\'s available memory)')
    party.set_defaults(func=_party)

    secret = sub.add_parser('secret', help='write a new secret for the parties of a run (timm-mpc party --secret-file)')
    secret.add_argument('file', help='where to write it (readable by you only; an existing file is never overwritten)')
    secret.set_defaults(func=_secret)

    add_training_commands(sub)
    add_hub_commands(sub)
    return parser


def _print_error(command: str, error: object) -> None:
    print(f'timm-mpc {command}: error: {error}', file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # how a measurement was made, for its record
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        _print_error(args.command, e)
        from .secure.engines import exit_after_failure
        exit_after_failure(2)
        return 2


if __name__ == '__main__':
    sys.exit(main())

"""The secure-inference commands of ``timm-mpc``: ``predict`` (both parties on local processes), ``bench``, ``party``
(one party per host) and ``secret``."""
import argparse
import json
import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional

import torch

from ..command_args import add_model_args, positive_int, print_error, resolve_model
from ..data import calibration_examples, example_images
from ..pattern import count_head_kinds
from ..profile import NETWORKS, NetworkSetting
from .admission import read_secret, write_secret
from .bench import baseline_of, compare_logits, format_comparison, format_profile, run_bench, write_json
from .crypten.party import run_dealer
from .engines import DEFAULT_ENGINE, ENGINES, get_engine
from .launch import secure_predict
from .links import ROLES, LinkSecurity, is_loopback, parse_address, parse_rendezvous
from .memory import available_memory, parse_memory
from .plan import build_secure_plan, check_image_tensor, check_images
from .protocol import OwnerLimits
from .settings import GELU_METHODS, PROVIDERS, SecureSettings

__all__ = ['add_secure_commands', 'add_tls_args', 'add_network_args', 'add_protocol_args', 'tls_security',
           'report_client']

SPU_LINGER_S = 5.0
"""How long a ``timm-mpc party`` process of an SPU run stays after its party is done: SPU 0.9.5's link still talks
to the peer after its own closing returned, and a party that ended at once left the other's closing unanswered,
which the other then retried for its whole timeout and reported as a lost party. (Local parties stay until every
party has reported, :meth:`~.launch.PartyReports.wait_for_release`.)"""


def _settings(args: argparse.Namespace) -> Any:
    base = SecureSettings.crypten_defaults if args.crypten_defaults else SecureSettings
    protocol = dict(weight_masks=args.weight_masks, fss_comparisons=args.fss_comparisons, gelu=args.gelu)
    # an insecure provider or protocol warns when it runs
    return base(provider=args.provider, timeout_s=args.timeout, engine=args.engine, protocol=args.protocol,
                **{name: value for name, value in protocol.items() if value is not None})


def _networks(args: argparse.Namespace) -> Dict[str, Any]:
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


def _link_security(args: argparse.Namespace, settings: Any) -> Optional[LinkSecurity]:
    """The party's TLS (``--tls-*``, ``--expect-*``), or None for ``--insecure-plaintext`` on loopback; checked
    before anything runs."""
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    expect = {role: getattr(args, f'expect_{role}') for role in ROLES if getattr(args, f'expect_{role}')}
    if settings.engine == 'spu' and expect:
        raise ValueError('SPU\'s link checks a peer\'s certificate against the CA only, not its identity: leave '
                         '--expect-* out and give as --tls-ca the CA that signed the other party\'s certificate alone '
                         '(docs/deployment.md)')
    if args.insecure_plaintext:
        if any(tls):
            raise ValueError('--insecure-plaintext and --tls-cert/--tls-key/--tls-ca exclude each other')
        addresses = [parse_rendezvous(args.rendezvous)[0]]
        for option, address in (('--dealer', args.dealer), ('--client-address', args.client_address)):
            if address:
                addresses.append(parse_address(address, option)[0])
        remote = [a for a in addresses if not is_loopback(a)]
        if remote:
            raise ValueError(f'--insecure-plaintext is for loopback only; {remote[0]} is not: give --tls-cert, '
                             f'--tls-key and --tls-ca')
        return None
    if settings.engine == 'spu':
        return tls_security(args, [])
    met = {0: ['client', 'dealer'], 1: ['owner', 'dealer'], 2: ['owner', 'client']}[args.rank]
    return tls_security(args, met if settings.dealer else [r for r in met if r != 'dealer'])


def _party(args: argparse.Namespace) -> int:
    settings = _settings(args)
    networks = _networks(args)  # checked before anything runs
    parse_rendezvous(args.rendezvous)
    secret = read_secret(args.secret_file)
    security = _link_security(args, settings)
    if not settings.secure:
        flags = f'--provider {settings.provider}' if settings.engine == 'crypten' else \
            f'--engine {settings.engine} --protocol {settings.protocol}'
        raise ValueError(f'timm-mpc party runs real parties, so it refuses {flags} (the owner would deal its own '
                         f'triples and could open the client\'s data); use CrypTen with --provider TTP and a dealer '
                         f'(rank 2), or --engine spu --protocol cheetah')
    if args.client_address and settings.engine != 'spu':
        raise ValueError('--client-address is for --engine spu (CrypTen parties meet at the rendezvous only)')
    if args.dealer and not settings.dealer:
        raise ValueError(f'--dealer names the dealer of CrypTen with provider TTP; engine {settings.engine} with '
                         f'protocol {settings.protocol} has none')
    engine = get_engine(settings.engine).load()
    extra = dict(client_address=args.client_address, security=security) if settings.engine == 'spu' else \
        dict(dealer=args.dealer, security=security)
    # what ends a party from a watchdog thread (the other party not met, or lost) reads as the command's errors do
    extra['on_timeout'] = partial(print_error, 'party')
    torch.set_num_threads(args.threads or (1 if _on_loopback(args.rendezvous) else torch.get_num_threads()))
    if args.rank == 2 and not settings.dealer:
        raise ValueError(f'engine {settings.engine} with protocol {settings.protocol} has no dealer: run ranks 0 and 1 only')
    if args.rank == 2:
        print(f'dealer: serving multiplication triples at {args.dealer or "the rendezvous host, the next port"}',
              flush=True)
        run_dealer(args.rendezvous, settings, secret, **extra)
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
              f'logit itself', flush=True)
        _linger(settings)
        return 0
    images = _load_images(args.images, args.batch)
    print(f'client: {images.shape[0]} images; meeting the owner at {args.rendezvous}', flush=True)
    result = engine.run_client(args.rendezvous, images, settings, secret, log=_log, clamp=args.clamp_images,
                               batch_size=args.batch_size, **extra)
    report_client(args, result, networks)
    _linger(settings)
    return 0


def report_client(args: argparse.Namespace, result: Any, networks: Dict[str, Any]) -> None:
    """What a client command prints of its result (the costs, the predicted classes), and its ``--json``."""
    profile = result.profile.to_dict(networks)
    print(format_profile(profile, args.network))
    print('client: predicted classes', result.logits.argmax(-1).tolist())
    if result.implausible:
        print(f'client: images {result.implausible} got logits beyond the plan\'s bound ({result.plan.logit_bound:g}): '
              f'a failed truncation (about one image in a thousand); run them again', file=sys.stderr)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(profile=profile, logits=result.logits.tolist()), f, indent=1)
    sys.stdout.flush()


def _linger(settings: Any) -> None:
    if settings.engine == 'spu':
        time.sleep(min(SPU_LINGER_S, settings.timeout_s))  # see SPU_LINGER_S


def _secret(args: argparse.Namespace) -> int:
    path = write_secret(args.file)
    print(f'wrote a new secret to {path}: give it to the owner, the client and the dealer over a channel you trust '
          f'(each runs timm-mpc party --secret-file {path.name})')
    return 0


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """The TLS options of a party or a service: its certificate, key and CA, and the identities it pins per role."""
    p.add_argument('--tls-cert', default=None, help='this party\'s certificate (PEM) for TLS 1.3 on every link')
    p.add_argument('--tls-key', default=None, help='the private key of --tls-cert (PEM)')
    p.add_argument('--tls-ca', default=None,
                   help='the certificate authority (PEM) whose signature every peer\'s certificate must carry')
    for role in ROLES:
        p.add_argument(f'--expect-{role}', action='append', default=None, metavar='NAME',
                       help=f'the certificate identity (common name or DNS name) accepted of the {role}; repeat for '
                            f'several' + (' (an owner: the clients it serves)' if role == 'client' else ''))


def tls_security(args: argparse.Namespace, roles: List[str]) -> LinkSecurity:
    """``--tls-*`` and ``--expect-*`` as a :class:`LinkSecurity` that pins each of ``roles``; a clear error for a
    missing file or pin."""
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    if not all(tls):
        raise ValueError('the links need --tls-cert, --tls-key and --tls-ca (TLS 1.3, a certificate on both sides; '
                         'a party on loopback may instead run --insecure-plaintext); missing: '
                         + ', '.join(f'--tls-{n}' for n, v in zip(('cert', 'key', 'ca'), tls) if not v))
    expect = {role: getattr(args, f'expect_{role}') for role in ROLES if getattr(args, f'expect_{role}')}
    security = LinkSecurity(args.tls_cert, args.tls_key, args.tls_ca, expect)
    security.require(roles)
    return security


def _add_batch_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--batch-size', type=positive_int, default=None,
                   help='client: run the images this many at a time in one session (the weights are shared once); '
                        'default: all at once')


def _memory_size(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_network_args(p: argparse.ArgumentParser) -> None:
    """The network a latency estimate is made for (:func:`_networks` reads them)."""
    p.add_argument('--network', choices=['lan', 'wan'], default='lan', help='network for the latency estimate')
    p.add_argument('--rtt-ms', type=float, default=None, help='override the network\'s round-trip time')
    p.add_argument('--bandwidth-mbps', type=float, default=None, help='override the network\'s bandwidth')


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """CrypTen's protocol settings (:func:`_settings` reads them)."""
    p.add_argument('--crypten-defaults', action='store_true', help='CrypTen\'s default approximations')
    p.add_argument('--weight-masks', action=argparse.BooleanOptionalAction, default=None,
                   help='CrypTen: mask the owner\'s weights once per session (each linear weight\'s difference opened '
                        'when the weights are shared); every call then opens only its activations (default: on with '
                        'CrypTen)')
    p.add_argument('--gelu', choices=GELU_METHODS, default=None,
                   help='secure GeLU: spline (a piecewise cubic by comparisons; needs FSS comparisons; the default with '
                        'them), exp_fit (the default without), or erf (CrypTen\'s)')
    p.add_argument('--fss-comparisons', action=argparse.BooleanOptionalAction, default=None,
                   help='CrypTen: compare by the dealer\'s keys of a distributed comparison function (one round and 16 '
                        'bytes per compared element; the dealer sends each party about 1.5 kB of keys per element; '
                        'default: on with CrypTen and its offline phase)')


def _add_secure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--batch', type=positive_int, default=None,
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
    add_network_args(p)
    add_protocol_args(p)
    p.add_argument('--json', default=None, help='write the figures to this JSON file')


def add_secure_commands(sub: Any) -> None:
    """Add the secure-inference subcommands to the ``timm-mpc`` parser."""
    predict = sub.add_parser('predict', help='two-party secure prediction on local processes, with its costs')
    add_model_args(predict, required=False)
    _add_secure_args(predict)
    _add_batch_size_arg(predict)
    predict.add_argument('--max-memory', type=_memory_size, default=None,
                         help='bound on the peak memory of the processes together, e.g. 6GiB: without --batch-size, '
                              'the largest batches that fit it (predicted by a dry run, CrypTen only)')
    predict.set_defaults(func=_predict, batch=4)

    bench = sub.add_parser('bench', help='secure cost against the all-Softmax, exact-GeLU baseline')
    add_model_args(bench)
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
    party.add_argument('--threads', type=positive_int, default=None,
                       help='torch threads of this party (default: 1 when the rendezvous is on loopback, as the '
                            'parties then share the cores, as in predict; else all of them)')
    party.add_argument('--dealer', default=None,
                       help='HOST:PORT where the dealer (rank 2) listens: the dealer\'s own address, where the owner and '
                            'the client reach it (default: the rendezvous host, the next port)')
    add_tls_args(party)
    party.add_argument('--insecure-plaintext', action='store_true',
                       help='links without TLS, for parties on this machine only (loopback addresses): whoever can '
                            'read the links reads everything')
    party.add_argument('--client-address', default=None,
                       help='--engine spu: HOST:PORT where the client (rank 1) listens (default: the rendezvous host, '
                            'the next port)')
    add_model_args(party, option=True)
    _add_secure_args(party)
    _add_batch_size_arg(party)
    party.add_argument('--max-batch-size', type=positive_int, default=32,
                       help='owner: the largest batch a client may announce (default 32), refused before any work')
    party.add_argument('--max-images', type=positive_int, default=1024,
                       help='owner: the most images a client may announce for one run (default 1024)')
    party.add_argument('--max-memory', type=_memory_size, default=None,
                       help='owner: bound on the predicted memory of the largest batch\'s dry run, e.g. 8GiB '
                            '(default: this machine\'s available memory)')
    party.set_defaults(func=_party)

    secret = sub.add_parser('secret', help='write a new secret for the parties of a run (timm-mpc party --secret-file)')
    secret.add_argument('file', help='where to write it (readable by you only; an existing file is never overwritten)')
    secret.set_defaults(func=_secret)

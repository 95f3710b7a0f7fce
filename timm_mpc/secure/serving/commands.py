"""The services of ``timm-mpc``: ``serve`` (the model owner, many clients), ``dealer`` (the dealer of their sessions)
and ``query`` (a client of ``serve``). Every link is TLS 1.3 with each peer pinned (docs/deployment.md)."""
import argparse
from typing import Any

import torch

from ...command_args import add_model_args, positive_int, resolve_model
from ...pattern import count_head_kinds
from ..commands import (
    _add_batch_size_arg, _calibration, _load_images, _log, _memory_size, _networks, _settings, add_network_args,
    add_protocol_args, add_tls_args, report_client, tls_security,
)
from ..crypten.party import run_client
from ..plan import build_secure_plan
from .dealer import DealerService
from .owner import OwnerService, ServiceLimits
from .query import request_session

__all__ = ['add_service_commands']


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    security = tls_security(args, ['client', 'dealer'])
    limits = ServiceLimits(args.max_sessions, args.max_memory, args.max_images_per_client, args.max_images,
                           args.max_batch_size, args.queue_timeout)
    model = resolve_model(args)
    plan = build_secure_plan(model, settings, _calibration(args))
    service = OwnerService(plan, plan.owner_weights(model), settings, args.listen, args.dealer, security, limits,
                           session_ports=args.session_ports)
    print(f'owner: {args.model}, heads {count_head_kinds(model)}; serving clients {security.expect["client"]} at '
          f'{args.listen}, dealer at {args.dealer}', flush=True)
    service.serve_until_signalled()
    return 0


def _dealer(args: argparse.Namespace) -> int:
    service = DealerService(args.listen, tls_security(args, ['owner', 'client']), args.max_sessions, args.timeout,
                            session_ports=args.session_ports)
    service.serve_until_signalled()
    return 0


def _query(args: argparse.Namespace) -> int:
    networks = _networks(args)  # checked before anything runs
    security = tls_security(args, ['owner', 'dealer'])
    images = _load_images(args.images, args.batch)
    print(f'client: {images.shape[0]} images; asking the owner\'s service at {args.server} for a session', flush=True)
    offer = request_session(args.server, security, int(images.shape[0]), args.batch_size, args.timeout,
                            args.queue_timeout, _log)
    print(f'client: session {offer.number}: meeting the owner at {offer.rendezvous} and the dealer at {offer.dealer}',
          flush=True)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    result = run_client(offer.rendezvous, images, offer.settings, offer.secret, log=_log, clamp=args.clamp_images,
                        batch_size=args.batch_size, dealer=offer.dealer, security=security)
    report_client(args, result, networks)
    return 0


def _port_range(text: str) -> range:
    low, _, high = text.partition('-')
    if not (low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535):
        raise argparse.ArgumentTypeError(f'{text!r} is not LOW-HIGH, two ports from 1024 to 65535 with LOW <= HIGH')
    return range(int(low), int(high) + 1)


def _add_service_args(p: argparse.ArgumentParser, listen: str) -> None:
    p.add_argument('--listen', required=True, help=f'HOST:PORT where the {listen} listens (that address only)')
    p.add_argument('--session-ports', type=_port_range, default=None, metavar='LOW-HIGH',
                   help='the ports its sessions\' processes listen on, one each, on the --listen host (open them to '
                        'the peers; default: any below the system\'s range for outgoing connections)')
    add_tls_args(p)
    p.add_argument('--timeout', type=float, default=120.0,
                   help='seconds any wait on a peer may last without a byte (a stalled session ends after it)')


def add_service_commands(sub: Any) -> None:
    """Add ``serve``, ``dealer`` and ``query`` to the ``timm-mpc`` parser."""
    serve = sub.add_parser('serve', help='the model owner as a service: one secure session per client, many clients')
    add_model_args(serve)
    _add_service_args(serve, 'service')
    serve.add_argument('--dealer', required=True, help='HOST:PORT of the dealer\'s service (timm-mpc dealer)')
    serve.add_argument('--calibration-images', default=None,
                       help='.pt images for the plain-text range pass (default: the shipped examples)')
    serve.add_argument('--max-sessions', type=positive_int, default=2,
                       help='sessions at once, each an owner process of its own (default 2); the rest wait in turn')
    serve.add_argument('--max-memory', type=_memory_size, default=None,
                       help='bound on the memory of the service and its sessions together, e.g. 8GiB: a session '
                            'waits until its predicted memory fits (default: none)')
    serve.add_argument('--max-images-per-client', type=positive_int, default=None,
                       help='images a client (by certificate identity) may have predicted over the service\'s life '
                            '(default: no bound)')
    serve.add_argument('--max-images', type=positive_int, default=1024, help='images of one session (default 1024)')
    serve.add_argument('--max-batch-size', type=positive_int, default=32,
                       help='the largest batch a client may ask for (default 32)')
    serve.add_argument('--queue-timeout', type=float, default=600.0,
                       help='seconds a client may wait for its session (default 600)')
    add_protocol_args(serve)
    serve.set_defaults(func=_serve, provider='TTP', engine='crypten', protocol=None)

    dealer = sub.add_parser('dealer', help='the dealer as a service: the sessions of the owners it accepts')
    _add_service_args(dealer, 'dealer')
    dealer.add_argument('--max-sessions', type=positive_int, default=8, help='sessions at once (default 8)')
    dealer.set_defaults(func=_dealer)

    query = sub.add_parser('query', help='predict images with an owner\'s service (timm-mpc serve)')
    query.add_argument('--server', required=True, help='HOST:PORT of the owner\'s service')
    query.add_argument('--images', required=True, help='.pt file with a (B, C, H, W) tensor of normalized images')
    query.add_argument('--batch', type=positive_int, default=None, help='the first this many images (default: all)')
    _add_batch_size_arg(query)
    query.add_argument('--clamp-images', action='store_true',
                       help='clamp values outside the model\'s input range instead of refusing the images')
    add_tls_args(query)
    query.add_argument('--timeout', type=float, default=120.0, help='seconds any wait on a peer may last')
    query.add_argument('--queue-timeout', type=float, default=600.0,
                       help='seconds to wait for a session while the service is busy (default 600)')
    query.add_argument('--threads', type=positive_int, default=None, help='torch threads (default: all)')
    add_network_args(query)
    query.add_argument('--json', default=None, help='write the logits (under "logits") and the costs to this JSON file')
    query.set_defaults(func=_query)

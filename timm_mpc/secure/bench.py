"""``timm-mpc bench``: secure cost of a model against its all-Softmax, exact-GeLU baseline, in one run."""
import copy
import json
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from timm.layers import Mlp

from ..layers.attn_kinds import BASELINE_KIND
from ..layers.linearizable_mlp import LinearizableMlp
from ..pattern import count_head_kinds, get_attn_pattern, set_attn_pattern
from ..profile import NETWORKS, CostProfile, NetworkSetting
from ..reader import read_model
from ..utils import inference_pass
from .launch import SecureResult, secure_predict
from .plan import check_images
from .settings import SecureSettings

__all__ = ['baseline_of', 'compare_logits', 'run_bench', 'secure_accuracy', 'format_profile']


def baseline_of(model: nn.Module) -> nn.Module:
    """A copy of the model and weights with Softmax in every head and exact GeLU in every MLP (the paper's
    baseline); ``model`` itself is not changed."""
    base = copy.deepcopy(model)
    set_attn_pattern(base, BASELINE_KIND)
    for _, mlp in read_model(base).mlps:
        if isinstance(mlp, LinearizableMlp):
            mlp.set_pattern('gelu')
        if isinstance(mlp, Mlp):  # fc1 -> act -> fc2 (a gated MLP keeps its own activation)
            mlp.act = nn.GELU()
    return base


def compare_logits(secure: torch.Tensor, plain: torch.Tensor) -> Dict[str, float]:
    """Max absolute error and top-1 agreement of secure against plain-text logits, with the image of the largest
    error and those whose top-1 differs (their indices)."""
    errors = (secure - plain).abs().reshape(plain.shape[0], -1).amax(-1)
    differ = secure.argmax(-1) != plain.argmax(-1)
    return dict(max_abs_error=float(errors.max()), top1_agreement=float((~differ).float().mean()),
                images=int(plain.shape[0]), worst_image=int(errors.argmax()),
                disagreeing=differ.nonzero().flatten().tolist())


def _summary(profile: CostProfile, networks: Dict[str, NetworkSetting]) -> Dict[str, Any]:
    return dict(rounds=profile.rounds, bytes=profile.bytes, wall_s=profile.wall_s, compute_s=profile.compute_s,
                dealer=dict(profile.dealer),
                latency_s={n: profile.latency(s) for n, s in networks.items()})


def run_bench(
        configs: Dict[str, nn.Module],
        images: torch.Tensor,
        settings: SecureSettings,
        networks: Optional[Dict[str, NetworkSetting]] = None,
        check: bool = False,
        baseline: str = 'baseline',
        calibration_images: Optional[torch.Tensor] = None,
        clamp_images: bool = False,
) -> Dict[str, Any]:
    """Securely run every model of ``configs`` on ``images`` and compare each with ``configs[baseline]``.

    Returns a JSON-ready dict: per configuration the pattern, head counts, cost profile (per layer and
    per operator, the dealer's part apart), latency per network, ratios to the baseline and, with ``check``,
    accuracy under MPC. ``calibration_images`` and ``clamp_images`` are :func:`secure_predict`'s.
    """
    networks = networks or NETWORKS
    results: Dict[str, Dict[str, Any]] = {}
    for name, model in tqdm(configs.items(), desc='secure inference', unit='model'):
        res: SecureResult = secure_predict(model, images, settings=settings, calibration_images=calibration_images,
                                           clamp_images=clamp_images, return_result=True)
        entry = dict(pattern=get_attn_pattern(model), heads=count_head_kinds(model),
                     **_summary(res.profile, networks), profile=res.profile.to_dict(networks))
        if check:
            with inference_pass(model):
                entry['accuracy'] = compare_logits(res.logits, model(check_images(res.plan, images, clamp=clamp_images)))
        results[name] = entry
    base = results[baseline]
    for entry in results.values():
        entry['ratio_to_baseline'] = dict(
            rounds=base['rounds'] / entry['rounds'], bytes=base['bytes'] / entry['bytes'],
            wall=base['wall_s'] / entry['wall_s'], compute=base['compute_s'] / entry['compute_s'],
            **{f'latency_{n}': base['latency_s'][n] / entry['latency_s'][n] for n in networks})
    return dict(settings=settings.to_dict(), batch=int(images.shape[0]),
                networks={n: vars(s) for n, s in networks.items()}, results=results)


def secure_accuracy(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        settings: SecureSettings,
        batch: int = 32,
        calibration_images: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """Top-1 accuracy (%) under two-party MPC and in plain text on the same images, and how far they agree.

    The images go through one :func:`secure_predict` session ``batch`` at a time, with the owner calibrating on
    ``calibration_images`` (default: the shipped examples).
    """
    secure = secure_predict(model, images, settings=settings, calibration_images=calibration_images, batch_size=batch)
    with inference_pass(model):
        plain = model(images)
    agree = compare_logits(secure, plain)
    return dict(images=int(images.shape[0]), batch=batch,
                top1=100 * float((secure.argmax(-1) == labels).float().mean()),
                plain_top1=100 * float((plain.argmax(-1) == labels).float().mean()),
                agreement=100 * agree['top1_agreement'], max_abs_error=agree['max_abs_error'],
                worst_image=agree['worst_image'], disagreeing=agree['disagreeing'])


def format_profile(profile: Dict[str, Any], network: str) -> str:
    """A per-layer table of one configuration's profile (from :meth:`CostProfile.to_dict`)."""
    lines = [f'{"layer":14s} {"rounds":>7s} {"MB":>9s} {"time s":>8s}   operators (rounds); time: the parties\' own']
    by_op_layer: Dict[str, List[str]] = {}
    for row in profile['rows']:
        if row['rounds']:
            by_op_layer.setdefault(row['layer'], []).append(f'{row["op"]} {row["rounds"]}')
    for layer, agg in profile['by_layer'].items():
        lines.append(f'{layer:14s} {agg["rounds"]:7d} {agg["bytes"] / 1e6:9.2f} {agg["time_s"]:8.3f}   '
                     f'{", ".join(by_op_layer.get(layer, []))}')
    lines.append(f'{"total":14s} {profile["rounds"]:7d} {profile["bytes"] / 1e6:9.2f} {profile["compute_s"]:8.3f}   '
                 f'{network.upper()} latency {profile["latency_s"][network]:.3f} s (wall time {profile["wall_s"]:.3f} s)')
    dealer = profile['dealer']
    if dealer['requests']:
        recorded = f'; {dealer["record_s"]:.1f} s recording the requests' if dealer.get('record_s') else ''
        lines.append(f'{"dealer":14s} {dealer["requests"]:7d} {dealer["bytes"] / 1e6:9.2f} {dealer["time_s"]:8.3f}   '
                     f'requests to the dealer by the owner (offline phase: not in the rows, rounds or latency '
                     f'above{recorded})')
    return '\n'.join(lines)


def format_comparison(report: Dict[str, Any], network: str) -> str:
    """One line per configuration: rounds, MB, wall time, the dealer's part, LAN/WAN latency and ratios to the
    baseline."""
    nets = list(report['networks'])
    head = f'{"config":22s} {"rounds":>7s} {"MB":>9s} {"wall s":>7s} {"dealer s":>8s} {"dealer MB":>9s} '
    head += ' '.join(f'{n.upper() + " s":>8s}' for n in nets)
    head += ' ' + ' '.join(f'{"x " + n.upper():>7s}' for n in nets)
    lines = [head]
    for name, e in report['results'].items():
        line = f'{name:22s} {e["rounds"]:7d} {e["bytes"] / 1e6:9.1f} {e["wall_s"]:7.2f} '
        line += f'{e["dealer"]["time_s"]:8.2f} {e["dealer"]["bytes"] / 1e6:9.1f} '
        line += ' '.join(f'{e["latency_s"][n]:8.2f}' for n in nets)
        line += ' ' + ' '.join(f'{e["ratio_to_baseline"][f"latency_{n}"]:6.2f}x' for n in nets)
        if 'accuracy' in e:
            acc = e['accuracy']
            line += f'  top-1 agree {acc["top1_agreement"]:.0%}, max err {acc["max_abs_error"]:.2g}'
        lines.append(line)
    return '\n'.join(lines)


def write_json(report: Dict[str, Any], path: str) -> None:
    with open(path, 'w') as f:
        json.dump(report, f, indent=1)

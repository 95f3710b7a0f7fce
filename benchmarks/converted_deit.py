"""A converted DeiT-Tiny at 224×224 under MPC: what a user who brings an ImageNet-size timm model meets.

``deit_tiny_patch16_224`` (random weights: the cost does not depend on them beyond the calibrated ranges), converted
with ``convert_to_mpc`` to all-Softmax, mu = 0.5 and all-Scaling, run with CrypTen (owner, client and dealer
processes on this machine) at batch 1 and 8: rounds, GB sent by both parties, wall time per image, LAN latency per
image, the peak memory of all the processes together (sampled from /proc every 0.2 s), and the saving of mu = 0.5
and all-Scaling against all-Softmax at the same batch. ``--protocols new previous`` runs each configuration under the
default protocol and the previous one (``fss_comparisons=False, weight_masks=False``) side by side, with WAN latency.

    python benchmarks/converted_deit.py --json benchmarks/results/converted_deit.json \\
        --markdown benchmarks/results/converted_deit.md

    python benchmarks/converted_deit.py --batches 1 --configs mu50 --protocols previous new \\
        --json benchmarks/results/converted_deit_protocols.json --markdown benchmarks/results/converted_deit_protocols.md

Targets: mu = 0.5 under 20 s per image at batch 8, with less than 8 GB of peak memory (issue 15); mu = 0.5 at batch
1, WAN per image at most half of the previous protocol's (issue 29).
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import timm
import torch

import timm_mpc
from timm_mpc.pattern import mu_pattern
from timm_mpc.secure import SecureSettings, secure_predict
from timm_mpc.secure.memory import PeakMemory
from timm_mpc.secure.plan import normalization

from report_io import add_report_args, earlier_report

CONFIGS = ('softmax', 'mu50', 'scaling')
TARGET_S, TARGET_GB = 20.0, 8.0
PROTOCOLS = dict(new=dict(), previous=dict(fss_comparisons=False, weight_masks=False))  # the default, the one before


def build(config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=10).eval()
    heads = [blk.attn.num_heads for blk in model.blocks]
    pattern = mu_pattern(heads, 0.5) if config == 'mu50' else config
    return timm_mpc.convert_to_mpc(model, pattern)


def images_for(model: torch.nn.Module, count: int) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(model, 3))
    return (torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(1)) - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batches', type=int, nargs='*', default=[1, 8])
    parser.add_argument('--configs', nargs='*', default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument('--protocols', nargs='*', default=['new'], choices=list(PROTOCOLS))
    add_report_args(parser, 'converted_deit.json')
    args = parser.parse_args()
    report = earlier_report(args)
    if report is None:
        report = dict(model='deit_tiny_patch16_224', img_size=224, engine='crypten', results={},
                      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__))
        for batch in args.batches:  # the configurations alternate within a batch size
            for config, protocol in ((c, p) for c in args.configs for p in args.protocols):
                model = build(config)
                images = images_for(model, batch)
                t0 = time.perf_counter()
                with PeakMemory() as memory:
                    result = secure_predict(model, images, SecureSettings(**PROTOCOLS[protocol]),
                                            calibration_images=images_for(model, 2), return_result=True)
                profile = result.profile.to_dict()
                with torch.no_grad():
                    agree = bool((result.logits.argmax(-1) == model(images).argmax(-1)).all())
                row = dict(config=config, protocol=protocol, batch=batch, rounds=profile['rounds'], bytes=profile['bytes'],
                           wall_s=profile['wall_s'], latency_s=profile['latency_s'], peak_bytes=memory.peak,
                           total_s=time.perf_counter() - t0, agrees=agree)
                report['results'][_key(config, batch, protocol)] = row
                print(f'{config:8s} {protocol:8s} batch {batch}: {row["rounds"]} rounds, {row["bytes"] / 1e9:.2f} GB, wall '
                      f'{row["wall_s"] / batch:.1f} s/image, peak {memory.peak / 2 ** 30:.2f} GiB, agrees {agree}',
                      flush=True)
                Path(args.json).write_text(json.dumps(report, indent=1))
    table = markdown(report)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + '\n')


def _key(config: str, batch: int, protocol: str) -> str:
    return f'{config}@{batch}' + ('' if protocol == 'new' else f' {protocol}')


def markdown(report) -> str:
    titles = dict(softmax='all-Softmax', mu50='μ = 0.5', scaling='all-Scaling')
    lines = ['| configuration | protocol | batch | rounds (batch) | GB (batch) | wall s / image | LAN s / image | '
             'WAN s / image | peak memory GiB | LAN saving | agrees |', '|' + '---|' * 11]
    results = report['results']
    for key, r in results.items():
        # rows of runs before the new protocol became the default: no protocol, keys without one
        protocol = r.get('protocol', 'previous')
        base = results.get(_key('softmax', r['batch'], r.get('protocol', 'new')))
        saving = f'{base["latency_s"]["lan"] / r["latency_s"]["lan"]:.2f}×' if base else '–'
        lines.append(f'| {titles[r["config"]]} | {protocol} | {r["batch"]} | {r["rounds"]:,} | {r["bytes"] / 1e9:.2f} | '
                     f'{r["wall_s"] / r["batch"]:.1f} | {r["latency_s"]["lan"] / r["batch"]:.1f} | '
                     f'{r["latency_s"]["wan"] / r["batch"]:.1f} | {r["peak_bytes"] / 2 ** 30:.2f} | {saving} | '
                     f'{"yes" if r["agrees"] else "no"} |')
    new, previous = results.get('mu50@1'), results.get('mu50@1 previous')
    if new and previous:
        ratio = new['latency_s']['wan'] / previous['latency_s']['wan']
        lines += ['', f'Target: μ = 0.5 at batch 1, WAN per image at most half of the previous protocol\'s: measured '
                      f'{new["latency_s"]["wan"]:.1f} s against {previous["latency_s"]["wan"]:.1f} s ({ratio:.2f}×).']
    mu = results.get('mu50@8')
    if mu:
        lines += ['', f'Target: μ = 0.5 at batch 8 under {TARGET_S:g} s per image and {TARGET_GB:g} GB: measured '
                      f'{mu["wall_s"] / 8:.1f} s per image, {mu["peak_bytes"] / 2 ** 30:.2f} GiB.']
    return '\n'.join(lines)


if __name__ == '__main__':
    main()

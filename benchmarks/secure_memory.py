"""The dry run's predictions against a measured secure run: peak memory, rounds and bytes, and what max_memory chooses.

For each model and batch size, ``secure_predict`` runs (CrypTen: owner, client and dealer processes on this machine)
while the resident memory of its processes is sampled from /proc every 0.2 s (the caller's own process, which holds
the model, left out, as the prediction leaves it out); the table puts the measured peak beside the dry run's
prediction, and the rounds and bytes of the real run beside the dry run's. Then each model runs its images under a
``max_memory`` bound without a batch size: the batch it chose and the measured peak against the bound.

    python benchmarks/secure_memory.py --json benchmarks/results/secure_memory.json \\
        --markdown benchmarks/results/secure_memory.md

Models: ``mpcvit_tiny`` (the shipped checkpoint, 32x32) and ``deit_tiny_patch16_224`` converted to mu = 0.5 (random
weights; 224x224). The dry runs are cached per machine (``$TIMM_MPC_CACHE``): a fresh cache measures them anew.
"""
import argparse
import json
import platform
import time

import timm
import torch
from tqdm import tqdm

import timm_mpc
from timm_mpc.profile import NETWORKS
from timm_mpc.data import example_images
from timm_mpc.pattern import mu_pattern
from timm_mpc.secure import secure_predict
from timm_mpc.secure.memory import PeakMemory, parse_memory
from timm_mpc.secure.plan import normalization

from report_io import add_report_args, earlier_report, write_report

MODELS = {
    # name: (batch sizes measured, images, max_memory bound)
    'mpcvit_tiny': ((1, 4, 16), 16, '3.5GiB'),
    'deit_tiny_mu50': ((1, 4), 4, '5GiB'),
}


def build(name: str):
    if name == 'mpcvit_tiny':
        model = timm.create_model('mpcvit_tiny', pretrained=True).eval()
        images = example_images()[0]
        return model, images.repeat(2, 1, 1, 1)
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=10).eval()
    timm_mpc.convert_to_mpc(model, mu_pattern([blk.attn.num_heads for blk in model.blocks], 0.5))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(model, 3))
    return model, (torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)) - mean) / std


def measure(model, images, **kwargs) -> dict:
    with PeakMemory(include_self=False) as memory:
        t0 = time.perf_counter()
        result = secure_predict(model, images, return_result=True, **kwargs)
        wall = time.perf_counter() - t0
    estimate = result.estimate
    return dict(images=images.shape[0], batch=estimate.batch, measured_peak=memory.peak,
                predicted_peak=result.predicted_peak, rounds=result.profile.rounds, dry_rounds=estimate.rounds,
                bytes=result.profile.bytes, dry_bytes=estimate.bytes, wall_s=wall,
                lan_s=result.profile.latency(NETWORKS['lan']), dry_lan_s=estimate.latency(NETWORKS['lan']), **kwargs)


def render(report: dict) -> str:
    gib = 2 ** 30
    lines = ['| model | images | batch | max_memory | predicted peak GiB | measured peak GiB | measured / predicted | '
             'rounds (run = dry run) | GB (run = dry run) | LAN s / image, run | LAN s / image, dry run |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in report['rows']:
        bound = '' if r.get('max_memory') is None else f'{parse_memory(r["max_memory"]) / gib:.2f} GiB'
        lines.append(f'| {r["model"]} | {r["images"]} | {r["batch"]} | {bound} | {r["predicted_peak"] / gib:.2f} | '
                     f'{r["measured_peak"] / gib:.2f} | {r["measured_peak"] / r["predicted_peak"]:.2f} | '
                     f'{r["rounds"]:,} ({"yes" if r["rounds"] == r["dry_rounds"] else "no: " + str(r["dry_rounds"])}) | '
                     f'{r["bytes"] / 1e9:.2f} ({"yes" if r["bytes"] == r["dry_bytes"] else "no"}) | '
                     f'{r["lan_s"] / r["batch"]:.1f} | {r["dry_lan_s"] / r["batch"]:.1f} |')
    ratios = [r['measured_peak'] / r['predicted_peak'] for r in report['rows']]
    lines += ['', f'Measured / predicted peak: median {sorted(ratios)[len(ratios) // 2]:.2f}, max {max(ratios):.2f} '
                  f'({len(ratios)} runs; {report["machine"]}).']
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='*', default=list(MODELS), choices=list(MODELS))
    add_report_args(parser, 'secure_memory.json')
    args = parser.parse_args()
    report = earlier_report(args)
    if report is None:
        report = dict(machine=f'{platform.processor() or platform.machine()}, torch {torch.__version__}', rows=[])
        for name in args.models:
            batches, count, bound = MODELS[name]
            model, images = build(name)
            for batch in tqdm(batches, desc=name, unit='batch size'):
                row = dict(model=name, **measure(model, images[:batch], batch_size=batch))
                report['rows'].append(row)
                tqdm.write(json.dumps(row))
            row = dict(model=name, **measure(model, images[:count], max_memory=bound))
            report['rows'].append(row)
            tqdm.write(json.dumps(row))
    write_report(args, report, render(report))


if __name__ == '__main__':
    main()

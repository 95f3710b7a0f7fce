"""Secure latency of mpcvit_tiny under CrypTen, measured side by side in one run.

Part 1 (targets): batch 1, timm-mpc's tuned settings, the all-Softmax + exact-GeLU baseline against
all-ReLU-Softmax, all-Scaling, the mu = 0.5 mix, all-2Quad and the MPCViT+ form (mu = 0.5 with every
GeLU token linearized), with ratios to the baseline. Part 2: what each secure setting does to the
baseline and the mu = 0.5 mix, starting from CrypTen's defaults, and, for comparison with figures measured
that way, the insecure owner-as-dealer setting. Part 3: top-1 agreement with plain text on the eight
shipped Fashion-MNIST test images.

Every run but the owner-as-dealer row has a dealer process outside both parties (the default); its traffic
and the owner's waits for it are reported apart and are not in the rounds, MB or latency.

    python benchmarks/secure_latency.py --json benchmarks/results/secure_latency.json \
        --png benchmarks/results/secure_latency.png

Weights are random unless --checkpoint is given (costs do not depend on the weights beyond the
calibrated ranges).
"""
import argparse
import json
import platform
from pathlib import Path

import timm
import torch

import timm_mpc
from timm_mpc.data import example_images
from timm_mpc.pattern import mu_pattern
from timm_mpc.secure.bench import baseline_of, format_comparison, run_bench
from timm_mpc.secure.settings import SecureSettings

TARGETS = {'mu50': 1.9, 'scaling': 2.5}  # LAN latency ratios to the baseline: the paper's CIFAR-10 mu = 0.5, and ours


def build(pattern, checkpoint=None, gelu_pattern=None):
    return timm_mpc.create_mpc_model('mpcvit_tiny', checkpoint=checkpoint, attn_pattern=pattern,
                                     gelu_pattern=gelu_pattern).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=None)
    parser.add_argument('--json', default='secure_latency.json')
    parser.add_argument('--png', default=None, help='the plot (default secure_latency.png when measuring)')
    parser.add_argument('--skip-settings', action='store_true', help='only part 1')
    parser.add_argument('--markdown', default=None, help='also write the tables as Markdown to this file')
    parser.add_argument('--from-json', default=None,
                        help='render the tables (and, with --png, the plot) of an earlier run; measure nothing')
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(markdown(report))
        if args.png:
            plot(report['part1'], args.png)
        return
    args.png = args.png or 'secure_latency.png'
    torch.manual_seed(0)

    mu50 = mu_pattern([4] * 7, 0.5)
    variants = {
        'relu_softmax': build('relu_softmax', args.checkpoint),
        'scaling': build('scaling', args.checkpoint),
        'mu50': build(mu50, args.checkpoint),
        '2quad': build('2quad', args.checkpoint),
        'mu50_plus': build(mu50, args.checkpoint, gelu_pattern='linear'),
    }
    configs = {'baseline': baseline_of(variants['mu50']), **variants}
    images, labels = example_images()
    one = images[:1]
    tuned = SecureSettings()

    print('part 1: tuned settings, batch 1')
    report = dict(machine=dict(platform=platform.platform(), cpus=torch.get_num_threads(),
                               torch=torch.__version__, timm=timm.__version__),
                  targets=TARGETS)
    report['part1'] = run_bench(configs, one, tuned, check=True)
    print(format_comparison(report['part1'], 'lan'))

    if not args.skip_settings:
        print('part 2: settings, from CrypTen\'s defaults to the tuned ones')
        steps = {
            'owner as dealer (insecure)': SecureSettings.crypten_defaults(provider='TFP_INSECURE'),
            'crypten_defaults': SecureSettings.crypten_defaults(),
            '+exp_fit_gelu': SecureSettings.crypten_defaults(gelu='exp_fit'),
            '+range_scaling': SecureSettings.crypten_defaults(gelu='exp_fit', range_scaling=True),
            '+batched_rounds (tuned)': tuned,
        }
        report['part2'] = {}
        pair = {'baseline': configs['baseline'], 'mu50': configs['mu50']}
        for name, settings in steps.items():
            report['part2'][name] = run_bench(pair, one, settings, check=True)
            print(name)
            print(format_comparison(report['part2'][name], 'lan'))

        print('part 3: top-1 agreement with plain text on 8 Fashion-MNIST test images (batch 8)')
        report['part3'] = {}
        for name, settings in (('crypten_defaults', SecureSettings.crypten_defaults()), ('tuned', tuned)):
            report['part3'][name] = run_bench(pair, images, settings, check=True)
            print(name)
            print(format_comparison(report['part3'][name], 'lan'))

    ratios = {k: report['part1']['results'][k]['ratio_to_baseline']['latency_lan'] for k in TARGETS}
    report['targets_met'] = {k: ratios[k] >= t for k, t in TARGETS.items()}
    print('LAN latency ratios to the baseline:', {k: round(v, 2) for k, v in ratios.items()},
          'targets', TARGETS, 'met' if all(report['targets_met'].values()) else 'NOT met')
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    plot(report['part1'], args.png)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(f'wrote {args.json} and {args.png}')


def markdown(report) -> str:
    """The README tables: part 1 with ratios and targets, part 2 (settings), part 3 (agreement)."""
    def rows(results, ratios=True, acc=True):
        out = []
        for name, e in results.items():
            r = e['ratio_to_baseline']
            line = (f'| {name} | {e["rounds"]} | {e["bytes"] / 1e6:.0f} | {e["wall_s"]:.2f} | {e["compute_s"]:.2f} | '
                    f'{e["dealer"]["bytes"] / 1e6:.0f} | {e["dealer"]["time_s"]:.2f} | '
                    f'{e["latency_s"]["lan"]:.2f} | {e["latency_s"]["wan"]:.1f} |')
            if ratios:
                line += f' {r["latency_lan"]:.2f}x | {r["latency_wan"]:.2f}x |'
            if acc:
                a = e['accuracy']
                line += f' {a["top1_agreement"]:.0%} of {a["images"]} | {a["max_abs_error"]:.2g} |'
            out.append(line)
        return out
    head = ('| config | rounds | MB (both parties) | wall s | parties\' compute s | dealer MB | dealer s | LAN s | WAN s | '
            'LAN speed-up | WAN speed-up | top-1 agreement | max logit error |\n'
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    lines = ['Part 1, tuned settings, batch 1:', '', head, *rows(report['part1']['results'])]
    if 'part2' in report:
        lines += ['', 'Part 2, each setting added to CrypTen\'s defaults (batch 1):', '', head]
        for step, part in report['part2'].items():
            lines += [line.replace('| ', f'| {step}: ', 1) for line in rows(part['results'])]
    if 'part3' in report:
        lines += ['', 'Part 3, batch 8 (the eight shipped Fashion-MNIST test images):', '', head]
        for step, part in report['part3'].items():
            lines += [line.replace('| ', f'| {step}: ', 1) for line in rows(part['results'])]
    return '\n'.join(lines)


def plot(part1, path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(part1['results'])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, net in zip(axes, ('lan', 'wan')):
        values = [part1['results'][n]['latency_s'][net] for n in names]
        bars = ax.bar(names, values, color=['#888'] + ['#3a7'] * (len(names) - 1))
        for bar, n in zip(bars, names):
            ratio = part1['results'][n]['ratio_to_baseline'][f'latency_{net}']
            ax.annotate(f'{ratio:.2f}x', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha='center', va='bottom', fontsize=8)
        n = part1['networks'][net]
        ax.set_title(f'{net.upper()} ({n["rtt_s"] * 1e3:g} ms RTT, {n["bandwidth_bps"] / 1e9:g} Gbit/s)')
        ax.set_ylabel('estimated latency (s)')
        ax.tick_params(axis='x', rotation=30)
    fig.suptitle('mpcvit_tiny secure inference (CrypTen, 2 parties and a dealer, batch 1): online latency and '
                 'speed-up over Softmax + GeLU', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == '__main__':
    main()

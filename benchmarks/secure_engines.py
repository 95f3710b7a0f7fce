"""The same weights on every MPC engine, measured in one run: CrypTen, SPU SEMI2K and SPU CHEETAH, and CrypTen with
its previous online protocol (CrypTen previous: comparisons by binary shares, the weights opened in every product).

For each engine, four configurations of one published Fashion-MNIST checkpoint (by default
mpcvit_tiny.fmnist_mu50_kd): the all-Softmax, exact-GeLU baseline; mu = 0.5 (the checkpoint's own pattern); all
Scaling; MPCViT+ (mu = 0.5 with every GeLU token linear). Per configuration: one test image's cost (rounds, MB,
wall time, LAN and WAN latency from the engines' own profiles, the saving against the baseline) and top-1
agreement with plain text on the first --images Fashion-MNIST test images (the owner calibrating on the first 64
training images). Two real processes per run, on loopback; CrypTen's runs have a dealer process (its traffic
apart), CHEETAH none, SEMI2K makes the owner the dealer (SPU 0.9.5: cost only).

    python benchmarks/secure_engines.py --images 64 --json benchmarks/results/secure_engines_agreement.json
    python benchmarks/secure_engines.py --repeats 3 --agreement-from benchmarks/results/secure_engines_agreement.json \\
        --json benchmarks/results/secure_engines.json --png benchmarks/results/secure_engines.png \\
        --markdown benchmarks/results/secure_engines.md

    python benchmarks/secure_engines.py --engines "CrypTen previous" CrypTen --repeats 3 \\
        --agreement-from benchmarks/results/online_protocol_agreement.json \\
        --json benchmarks/results/online_protocol.json --png benchmarks/results/online_protocol.png \\
        --markdown benchmarks/results/online_protocol.md   # CrypTen's previous protocol and the new default

The first run measures the agreement (about 50 minutes); the second, on an otherwise idle machine, the cost: each
configuration --repeats times, alternating, keeping the median wall time (and the minimum), with the agreement
taken from the first. CHEETAH is slow on this machine (OT and HE on two cores): one cost run per configuration, and
its agreement on --cheetah-images images.
"""
import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch

import timm_mpc
from timm_mpc.pattern import get_attn_pattern
from timm_mpc.secure import InsecureSettingWarning, SecureSettings, secure_predict
from timm_mpc.secure.bench import baseline_of, compare_logits
from timm_mpc.training.data import build_dataset, build_loader, model_data_config

from report_io import add_report_args, earlier_report

PAPER = {'mu50': 1.91, 'scaling': 2.51}  # the paper's SEMI2K LAN savings (CIFAR-10, same architecture)
ENGINES = {'SPU SEMI2K': dict(engine='spu', protocol='semi2k'), 'CrypTen': dict(engine='crypten'),
           'SPU CHEETAH': dict(engine='spu', protocol='cheetah'),
           # CrypTen's protocol before the new online phase (comparisons by binary shares, weights opened every call)
           'CrypTen previous': dict(engine='crypten', fss_comparisons=False, weight_masks=False)}
CONFIGS = ('baseline', 'mu50', 'scaling', 'mu50_plus')


def first_images(model, split, count):
    """The first ``count`` Fashion-MNIST images of ``split``, as the model's data config gives them."""
    config = model_data_config(model)
    loader = build_loader(build_dataset('fashion_mnist', split, in_chans=config['input_size'][0], subset=count),
                          config, 64, False, 0)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def configurations(checkpoint):
    build = lambda **kw: timm_mpc.create_mpc_model('mpcvit_tiny', checkpoint=checkpoint, **kw).eval()  # noqa: E731
    mu50 = build()
    return dict(baseline=baseline_of(mu50), mu50=mu50, scaling=build(attn_pattern='scaling'),
                mu50_plus=build(attn_pattern=get_attn_pattern(mu50), gelu_pattern='linear'))


def _secure(model, images, how, calibration, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', InsecureSettingWarning)  # SEMI2K: cost only, said in the table
        return secure_predict(model, images, SecureSettings(**how), calibration, **kwargs)


def measure(models, images, calibration, engines, count, cheetah_count, batch, repeats=1, agreement=None,
            save=lambda results: None):
    """Per engine: one image's cost per configuration, ``repeats`` times with the configurations alternating (CHEETAH
    once), keeping the run of median wall time (and the minimum); then the agreement on ``count`` images (CHEETAH:
    ``cheetah_count``), or the one ``agreement`` (an earlier run's results) holds for that engine and configuration."""
    results = {}
    for engine, how in engines.items():
        results[engine] = {}
        cheetah = how.get('protocol') == 'cheetah'
        n = cheetah_count if cheetah else count
        runs = {name: [] for name in models}
        for _ in range(1 if cheetah else repeats):
            for name, model in models.items():
                runs[name].append(_secure(model, images[:1], how, calibration, return_result=True))
        for name, model in models.items():
            t0 = time.perf_counter()
            by_wall = sorted(runs[name], key=lambda run: run.profile.wall_s)
            cost = by_wall[(len(by_wall) - 1) // 2]
            earlier = (agreement or {}).get(engine, {}).get(name)
            if earlier is not None:
                accuracy = dict(earlier['accuracy'], source='--agreement-from')
            else:
                logits = cost.logits if n == 1 else _secure(model, images[:n], how, calibration, batch_size=batch)
                with torch.no_grad():
                    accuracy = compare_logits(logits, model(images[:n]))
            profile = cost.profile.to_dict()
            results[engine][name] = dict(
                rounds=profile['rounds'], bytes=profile['bytes'], wall_s=profile['wall_s'],
                wall_s_min=by_wall[0].profile.wall_s, repeats=len(by_wall), latency_s=profile['latency_s'],
                by_op=profile['by_op'], accuracy=accuracy, secure=cost.settings.secure, total_s=time.perf_counter() - t0)
            r = results[engine][name]
            print(f'{engine:12s} {name:10s} {r["rounds"]:6d} rounds {r["bytes"] / 1e6:8.1f} MB wall {r["wall_s"]:7.2f} s '
                  f'(min {r["wall_s_min"]:.2f} of {r["repeats"]}) LAN {r["latency_s"]["lan"]:7.2f} s  agreement '
                  f'{100 * accuracy["top1_agreement"]:.1f}% on {accuracy["images"]} (max error '
                  f'{accuracy["max_abs_error"]:.3g})', flush=True)
        base = results[engine]['baseline']
        for r in results[engine].values():
            r['saving'] = {net: base['latency_s'][net] / r['latency_s'][net] for net in ('lan', 'wan')}
        save(results)  # after each engine: a long run that stops late keeps what it measured
    return results


def markdown(report):
    lines = ['| engine | configuration | rounds | MB | wall s, median (min) | LAN s | WAN s | LAN saving | WAN saving | '
             'agreement | max logit error |', '|' + '---|' * 11]
    titles = dict(baseline='all-Softmax baseline', mu50='μ = 0.5', scaling='all-Scaling', mu50_plus='MPCViT+ μ = 0.5')
    for engine, rows in report['results'].items():
        for name, r in rows.items():
            acc = r['accuracy']
            lines.append(f'| {engine}{"" if r["secure"] else " (owner deals)"} | {titles[name]} | {r["rounds"]:,} | '
                         f'{r["bytes"] / 1e6:,.0f} | {r["wall_s"]:.2f} ({r.get("wall_s_min", r["wall_s"]):.2f}, '
                         f'{r.get("repeats", 1)} run{"s" if r.get("repeats", 1) > 1 else ""}) | {r["latency_s"]["lan"]:.2f} | '
                         f'{r["latency_s"]["wan"]:.2f} | {r["saving"]["lan"]:.2f}× | {r["saving"]["wan"]:.2f}× | '
                         f'{100 * acc["top1_agreement"]:.1f}% of {acc["images"]} | {acc["max_abs_error"]:.3f} |')
    semi = report['results'].get('SPU SEMI2K')
    if semi:
        lines += ['', f'SEMI2K LAN saving against the paper\'s: μ = 0.5 {semi["mu50"]["saving"]["lan"]:.2f}× '
                      f'(paper {PAPER["mu50"]}×), all-Scaling {semi["scaling"]["saving"]["lan"]:.2f}× '
                      f'(paper {PAPER["scaling"]}×).']
    return '\n'.join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    engines = list(report['results'])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        rows = report['results'][engine]
        xs = [j + i * width for j in range(len(CONFIGS))]
        axes[0].bar(xs, [rows[c]['latency_s']['lan'] for c in CONFIGS], width, label=engine)
        axes[1].bar(xs, [rows[c]['saving']['lan'] for c in CONFIGS], width, label=engine)
    for ax, title in zip(axes, ('LAN latency per image (s, log scale)', 'LAN saving against all-Softmax')):
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(CONFIGS))])
        ax.set_xticklabels(['all-Softmax', 'μ = 0.5', 'all-Scaling', 'MPCViT+'])
        ax.set_title(title)
    axes[0].set_yscale('log')
    for engine_paper, value in PAPER.items():
        axes[1].scatter([CONFIGS.index(engine_paper) + width * (len(engines) - 1) / 2], [value], marker='*', s=120,
                        color='black', zorder=3, label='paper (SEMI2K)' if engine_paper == 'mu50' else None)
    axes[1].legend(fontsize=8)
    fig.suptitle('mpcvit_tiny (Fashion-MNIST weights), batch 1, two processes on one 2-core machine')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default='checkpoints/timm-mpc/mpcvit_tiny.fmnist_mu50_kd/model.safetensors')
    parser.add_argument('--images', type=int, default=64, help='test images for the agreement (CrypTen, SEMI2K)')
    parser.add_argument('--cheetah-images', type=int, default=1, help='test images for CHEETAH\'s agreement')
    parser.add_argument('--batch', type=int, default=16, help='images per batch in the agreement runs')
    parser.add_argument('--repeats', type=int, default=1,
                        help='cost runs per configuration, alternating (the median wall time is kept; CHEETAH: one)')
    parser.add_argument('--agreement-from', default=None,
                        help='take the agreement of each engine and configuration from this earlier JSON run '
                             'instead of measuring it (those runs\' wall times are not used)')
    parser.add_argument('--engines', nargs='*', default=list(ENGINES), choices=list(ENGINES))
    add_report_args(parser, 'secure_engines.json')
    parser.add_argument('--png', default=None)
    args = parser.parse_args()
    report = earlier_report(args)
    if report is None:
        torch.manual_seed(0)
        models = configurations(args.checkpoint)
        images, _ = first_images(models['mu50'], 'test', max(args.images, args.cheetah_images))
        calibration, _ = first_images(models['mu50'], 'train', 64)
        agreement = json.loads(Path(args.agreement_from).read_text())['results'] if args.agreement_from else None
        report = dict(checkpoint=args.checkpoint, batch=1, images=args.images, cheetah_images=args.cheetah_images,
                      repeats=args.repeats, agreement_from=args.agreement_from,
                      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__))

        def save(results):
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(report, results=results), indent=1))
        report['results'] = measure(models, images, calibration, {e: ENGINES[e] for e in args.engines}, args.images,
                                    args.cheetah_images, args.batch, args.repeats, agreement, save)
    print(markdown(report))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report) + '\n')
    if args.png:
        plot(report, args.png)


if __name__ == '__main__':
    main()

"""What makes training mpcvit_tiny on Fashion-MNIST faster on this CPU: one AdamW step (forward, backward, update)
per setting, measured side by side (settings alternate, repeated), as milliseconds per image against float32 at
batch 128; and timm's training loader (border, augmentation, collation) in images per second by worker count, against
the step's own rate. The runs (benchmarks/fmnist_runs.sh) use what helps.

    python benchmarks/train_speed.py [--repeats 8] [--json benchmarks/results/train_speed.json] [--markdown FILE]
"""
import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, List

import timm
import torch
from timm.optim import create_optimizer_v2
from tqdm import tqdm

import timm_mpc  # noqa: F401  registers the mpcvit_* models
from timm_mpc.data import FASHION_MNIST_DATA_CONFIG
from timm_mpc.training.config import RunConfig
from timm_mpc.training.data import build_dataset, build_loader

from report_io import add_report_args, earlier_report, write_report

# name -> (batch size, bfloat16 autocast, torch.compile, channels_last)
SETTINGS = {
    'float32, batch 128': (128, False, False, False),
    'bfloat16 autocast, batch 128': (128, True, False, False),
    'bfloat16 + channels_last, batch 128': (128, True, False, True),
    'bfloat16 + torch.compile, batch 128': (128, True, True, False),
    'bfloat16, batch 64': (64, True, False, False),
    'bfloat16, batch 256': (256, True, False, False),
}
BASELINE = 'float32, batch 128'


def make_step(batch: int, amp: bool, compile_: bool, channels_last: bool) -> Callable[[], None]:
    """One training step of a fresh mpcvit_tiny on random Fashion-MNIST-shaped input, as the training engine runs it."""
    model = timm.create_model('mpcvit_tiny', num_classes=10, img_size=32).train()
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_ else model
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast('cpu', dtype=torch.bfloat16) if amp else nullcontext():
            loss = loss_fn(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for _ in range(2):  # warm up (and compile)
        step()
    return step


def loader_rate(workers: int, batches: int = 30) -> float:
    """Images per second timm's training loader delivers (the runs' augmentation) with ``workers`` processes."""
    data = build_dataset('fashion_mnist', 'train', subset=128 * (batches + 2))
    cfg = RunConfig()  # the runs' augmentation: timm's defaults here, RandAugment off (--auto-augment none)
    loader = build_loader(data, FASHION_MNIST_DATA_CONFIG, batch_size=128, is_training=True, num_workers=workers,
                          scale=cfg.scale, hflip=cfg.hflip, auto_augment=None, re_prob=cfg.re_prob)
    it = iter(loader)
    next(it)  # the workers' start
    t0 = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches))
    return n / (time.perf_counter() - t0)


def measure(repeats: int) -> Dict[str, object]:
    steps = {name: make_step(*s) for name, s in tqdm(SETTINGS.items(), desc='building')}
    times: Dict[str, List[float]] = {name: [] for name in SETTINGS}
    for _ in tqdm(range(repeats), desc='rounds'):  # alternate the settings: the machine's noise hits each alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1000 / SETTINGS[name][0])
    steps_out = {name: dict(median_ms_per_image=statistics.median(t), min_ms_per_image=min(t)) for name, t in times.items()}
    loaders = {w: loader_rate(w) for w in (0, 1, 2)}
    return dict(repeats=repeats, torch=torch.__version__, threads=torch.get_num_threads(), steps=steps_out,
                loader_images_per_s={str(w): r for w, r in loaders.items()})


def render(report: Dict[str, object]) -> str:
    base = report['steps'][BASELINE]['median_ms_per_image']
    lines = ['| training step (mpcvit_tiny, 32x32) | ms per image, median | min | speed-up against float32 |',
             '|---|---:|---:|---:|']
    for name, s in report['steps'].items():
        lines.append(f'| {name} | {s["median_ms_per_image"]:.2f} | {s["min_ms_per_image"]:.2f} | '
                     f'{base / s["median_ms_per_image"]:.2f}x |')
    best = min(s['median_ms_per_image'] for s in report['steps'].values())
    lines += ['', '| loader workers | images per second | against the fastest step\'s rate |', '|---:|---:|---:|']
    for w, rate in report['loader_images_per_s'].items():
        lines.append(f'| {w} | {rate:.0f} | {rate * best / 1000:.1f}x |')
    return '\n'.join(lines) + f'\n\n{report["repeats"]} alternating rounds, torch {report["torch"]}, {report["threads"]} threads.\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=8)
    add_report_args(parser, 'benchmarks/results/train_speed.json')
    args = parser.parse_args()
    report = earlier_report(args) or measure(args.repeats)
    write_report(args, report, render(report))


if __name__ == '__main__':
    main()

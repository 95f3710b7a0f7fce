"""The MPCViT recipe on your own timm ViT, at full size: what the README's "The recipe on your own timm ViT" does.

``vit_tiny_patch16_224`` built at 32×32 with 4-pixel patches (65 tokens, 12 blocks, 3 heads) on Fashion-MNIST: a
teacher run of that architecture (all-Softmax, converted), the MPC-aware search from the teacher's weights,
binarized at mu = 0.5, retrained with token-level distillation from the teacher (its original, unconverted
architecture), evaluated in plain text on the 10,000 test images and under MPC (CrypTen, two real parties and a
dealer) on the first ``--secure-images``, published to a local folder and loaded back with
``timm.create_model('local-dir:...', pretrained=True)``, whose logits must equal the trained model's.

    python benchmarks/own_vit_recipe.py --runs runs/own_vit --json benchmarks/results/own_vit_recipe.json \\
        --markdown benchmarks/results/own_vit_recipe.md

Every step resumes where it stopped (timm-mpc's runs resume by epoch): run it again after an interruption.
"""
import argparse
import json
import time
from pathlib import Path

import timm
import torch

import timm_mpc
from timm_mpc.cli import main

from report_io import add_report_args, earlier_report, write_report

ARCH = 'vit_tiny_patch16_224'
MODEL = ['--model', ARCH, '--img-size', '32', '--model-kwargs', json.dumps(dict(patch_size=4, num_classes=10))]
COMMON = ['--amp', '--workers', '1', '--mixup', '0', '--cutmix', '0', '--auto-augment', 'none', '--drop-path', '0',
          '--weight-decay', '0.05']


def _step(name: str, argv: list, record: dict) -> None:
    t0 = time.time()
    print(f'== {name}: timm-mpc {" ".join(argv)}', flush=True)
    if main(argv) != 0:
        raise SystemExit(f'{name} failed')
    record.setdefault('minutes', {})[name] = round((time.time() - t0) / 60, 1)


def _run_record(folder: Path) -> dict:
    run = json.loads((folder / 'run.json').read_text())
    return dict(top1=run['final']['test_top1'], epochs=run['final']['epochs'],
                train_minutes=round(sum(r['epoch_s'] for r in run['history']) / 60, 1),
                head_kinds=run['model'].get('head_kinds'))


def run(args: argparse.Namespace) -> dict:
    r = Path(args.runs)
    teacher, search, student = r / 'teacher', r / 'search', r / 'mu50_kd'
    record: dict = dict(model=ARCH, img_size=32, patch_size=4, command=' '.join(MODEL))
    test_subset = ['--test-subset', str(args.test_subset)] if args.test_subset else []
    common = COMMON + test_subset + (['--train-subset', str(args.train_subset)] if args.train_subset else [])
    _step('teacher', ['train', '--output', str(teacher), *MODEL, '--epochs', str(args.teacher_epochs),
                      '--warmup-epochs', '1', '--lr', '1e-3', *common], record)
    _step('search', ['search', '--output', str(search), *MODEL, '--init-from', str(teacher / 'model.safetensors'),
                     '--epochs', str(args.search_epochs), '--warmup-epochs', '0', '--lr', '5e-4', '--mu', '0.5',
                     '--lam', '1e-3', *common], record)
    _step('retrain', ['retrain', '--output', str(student), *MODEL, '--searched', str(search / 'mu50.safetensors'),
                      '--teacher', str(teacher / 'model.safetensors'), '--epochs', str(args.retrain_epochs),
                      '--warmup-epochs', '0', '--lr', '5e-4', *common], record)
    evaluation = r / 'eval.json'
    _step('eval', ['eval', '--checkpoint', str(student / 'model.safetensors'), *MODEL, '--workers', '1',
                   '--secure-images', str(args.secure_images), '--json', str(evaluation), *test_subset], record)
    folder = r / 'published'
    _step('publish', ['publish', str(student / 'model.safetensors'), *MODEL[:2], '--model-kwargs',
                      json.dumps(dict(img_size=32, patch_size=4, num_classes=10)), '--repo',
                      f'me/{ARCH}.fmnist_mu50_kd', '--results', str(evaluation), '--run', str(student / 'run.json'),
                      '--dry-run', str(folder)], record)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    trained = timm_mpc.create_mpc_model(ARCH, checkpoint=str(student / 'model.safetensors'), img_size=32,
                                        patch_size=4, num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        record['loads_back_identical'] = bool(torch.equal(loaded(images), trained(images)))
    measured = json.loads(evaluation.read_text())
    record.update(teacher=_run_record(teacher), search=_run_record(search), student=_run_record(student),
                  plain_top1=measured['plain']['top1'], test_images=measured['plain']['images'],
                  secure=measured.get('secure'),
                  machine=measured.get('machine'))
    return record


def markdown(record: dict) -> str:
    s = record['secure']
    cost = s['cost']
    base, model = cost['baseline'], cost['model']
    rows = [
        f'| step | epochs | top-1 ({record["test_images"]:,} test images) | training minutes |', '|---|---|---|---|',
        f'| teacher (all-Softmax) | {record["teacher"]["epochs"]} | {record["teacher"]["top1"]:.2f}% | '
        f'{record["teacher"]["train_minutes"]} |',
        f'| search (α per head) | {record["search"]["epochs"]} | {record["search"]["top1"]:.2f}% | '
        f'{record["search"]["train_minutes"]} |',
        f'| μ = 0.5 retrained with KD | {record["student"]["epochs"]} | {record["student"]["top1"]:.2f}% | '
        f'{record["student"]["train_minutes"]} |',
        '',
        f'Under MPC (CrypTen, first {s["images"]} test images, owner calibrating on {s["calibration_images"]} '
        f'training images): top-1 {s["top1"]:.2f}% (plain text {s["plain_top1"]:.2f}%), agreement '
        f'{s["agreement"]:.1f}%. One image: {model["rounds"]} rounds, {model["bytes"] / 1e6:.0f} MB, LAN '
        f'{model["latency_s"]["lan"]:.2f} s against {base["latency_s"]["lan"]:.2f} s all-Softmax '
        f'({base["latency_s"]["lan"] / model["latency_s"]["lan"]:.2f}× saving), WAN {model["latency_s"]["wan"]:.1f} s '
        f'against {base["latency_s"]["wan"]:.1f} s. Published to a folder and loaded back with '
        f'`timm.create_model(\'local-dir:...\', pretrained=True)`: logits '
        f'{"identical" if record["loads_back_identical"] else "DIFFERENT"}. Steps (wall minutes): '
        + ', '.join(f'{k} {v}' for k, v in record['minutes'].items()) + '.',
    ]
    return '\n'.join(rows)


def main_cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', default='runs/own_vit', help='folder of the runs (resumed when present)')
    p.add_argument('--teacher-epochs', type=int, default=4)
    p.add_argument('--search-epochs', type=int, default=1)
    p.add_argument('--retrain-epochs', type=int, default=2)
    p.add_argument('--secure-images', type=int, default=100)
    p.add_argument('--train-subset', type=int, default=None, help='a quick check of the script: train on N images')
    p.add_argument('--test-subset', type=int, default=None, help='a quick check of the script: test on N images')
    add_report_args(p, None)
    args = p.parse_args()
    record = earlier_report(args) or run(args)
    write_report(args, record, markdown(record))


if __name__ == '__main__':
    main_cli()

"""The table of the published checkpoints (docs/models.md), from their measured results.json (written by
hub_checkpoints.sh), printed and written to benchmarks/results/pretrained.md. Measures nothing.

    python benchmarks/hub_table.py [checkpoints/timm-mpc]
"""
import json
import sys
from pathlib import Path

from timm_mpc.layers import BASELINE_KIND, SEARCH_KINDS

ORDER = ('fmnist_mu50_kd', 'fmnist_mu70_kd', 'fmnist_mu30_kd', 'fmnist_plus_mu50_kd', 'fmnist_softmax')  # the default first


def agreement(percent: float) -> str:
    """100% only when every image agrees (a rounded 99.9% would read as 100%)."""
    return '100%' if percent >= 100 else f'{min(percent, 99.9):.1f}%'


def row(name: str, results: dict) -> str:
    heads = results['model']['head_kinds']
    pattern = '/'.join(str(heads.get(k, 0)) for k in (*SEARCH_KINDS, BASELINE_KIND))
    if results['model'].get('gelu_pattern'):
        pattern += ' + GeLU lin.'
    secure = results['secure']
    model, base = secure['cost']['model'], secure['cost']['baseline']
    saving = '(baseline)' if set(heads) == {BASELINE_KIND} else f'{model["ratio_to_baseline"]["latency_lan"]:.2f}x'
    return (f'| `{name}` | {pattern} | {results["plain"]["top1"]:.2f} | {secure["top1"]:.2f} '
            f'({agreement(secure["agreement"])}, {secure["max_abs_error"]:.2g}) | {secure["images"]} | {model["rounds"]} | '
            f'{model["bytes"] / 1e6:.0f} | {model["dealer"]["bytes"] / 1e6:.0f} | {model["latency_s"]["lan"]:.2f} | '
            f'{base["latency_s"]["lan"]:.2f} | {saving} |')


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else 'checkpoints/timm-mpc')
    lines = ['| tag | heads RS/SC/SM | top-1 (%) | under MPC (%, agreement, max logit error) | images under MPC | rounds | '
             'MB | dealer MB | LAN (s) | all-Softmax LAN (s) | saving |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    lines += [row(f'mpcvit_tiny.{tag}', json.loads((root / f'mpcvit_tiny.{tag}' / 'results.json').read_text()))
              for tag in ORDER]
    table = '\n'.join(lines) + '\n'
    print(table, end='')
    out = Path(__file__).parent / 'results' / 'pretrained.md'
    out.write_text(table)


if __name__ == '__main__':
    main()

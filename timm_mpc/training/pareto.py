"""Accuracy against estimated secure latency, from runs' ``run.json`` files: a table and a PNG."""
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..layers.attn_kinds import SEARCH_KINDS
from ..utils import import_extra

__all__ = ['load_runs', 'pareto_table', 'plot_pareto']


def _priced_now(run: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """The run's fixed pattern priced by this machine's cost table (as its engine and protocol measure it here)."""
    from ..factory import create_mpc_model
    from ..cost.pricing import model_estimate
    from .config import RunConfig
    from .data import DATASETS
    cfg = RunConfig.from_dict(run['config'])
    num_classes = cfg.model_kwargs.get('num_classes') or DATASETS.get(cfg.dataset, {}).get('num_classes')
    if num_classes is None:
        raise ValueError(f'{path}: cannot rebuild the model to price it: dataset {cfg.dataset!r} has no known class '
                         f'count and model_kwargs name none; accepted datasets: {list(DATASETS)}')
    model = run['model']
    net = create_mpc_model(cfg.model, attn_pattern=model['attn_pattern'], gelu_pattern=model.get('gelu_pattern'),
                           **cfg.model_args(num_classes))
    return model_estimate(net, cfg.cost_settings())


def load_runs(paths: Sequence[str], reprice: bool = False) -> List[Dict[str, Any]]:
    """One row per run (a ``run.json`` or a folder holding one): name, accuracy, heads and latency.

    The latency is the estimate recorded with the run, or with ``reprice`` the run's pattern priced now by this
    machine's cost table: an estimate's seconds come from the machine that measured the table, so runs recorded on
    different machines compare only when priced again on one.

    Raises:
        ValueError: a run without final accuracy or without a secure estimate (a supernet, or a run
            made with ``--no-latency``).
    """
    rows = []
    for p in paths:
        path = Path(p) / 'run.json' if Path(p).is_dir() else Path(p)
        run = json.loads(path.read_text())
        final, model = run.get('final') or {}, run.get('model') or {}
        if final.get('test_top1') is None or 'secure_estimate' not in model:
            raise ValueError(f'{path}: not a finished run with a fixed pattern (needs final.test_top1 and '
                             'model.secure_estimate); a search supernet has no fixed pattern to price')
        estimate = _priced_now(run, path) if reprice else model['secure_estimate']
        kinds = model['head_kinds']
        heads = sum(kinds.values())
        gelu = model.get('gelu_pattern')
        rows.append(dict(
            name=path.parent.name, mode=run['mode'], top1=final['test_top1'], epochs=final['epochs'],
            kd=bool(run['config'].get('teacher')), heads=heads, head_kinds=kinds,
            relu_softmax=kinds.get(SEARCH_KINDS[0], 0), gelu_linearized=gelu is not None,
            latency_s=estimate['latency_s'], rounds=estimate['rounds'], bytes=estimate['bytes']))
    return rows


def pareto_table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of the runs, fastest LAN latency first."""
    lines = ['| run | top-1 (%) | epochs | KD | heads (RS/SA/other) | rounds | MB | LAN (s) | WAN (s) |',
             '|---|---:|---:|:-:|---|---:|---:|---:|---:|']
    for r in sorted(rows, key=lambda r: r['latency_s']['lan']):
        rs, sa = (r['head_kinds'].get(kind, 0) for kind in SEARCH_KINDS)
        lines.append(f"| {r['name']}{' (+GeLU lin.)' if r['gelu_linearized'] else ''} | {r['top1']:.2f} | "
                     f"{r['epochs']} | {'yes' if r['kd'] else 'no'} | {rs}/{sa}/{r['heads'] - rs - sa} | "
                     f"{r['rounds']:.0f} | {r['bytes'] / 1e6:.0f} | "
                     f"{r['latency_s']['lan']:.2f} | {r['latency_s']['wan']:.1f} |")
    return '\n'.join(lines)


def plot_pareto(rows: List[Dict[str, Any]], out: str, title: str = 'Accuracy against secure latency') -> None:
    """Two panels (LAN, WAN) of test top-1 against estimated secure latency, one labelled point per run."""
    matplotlib = import_extra('matplotlib', 'plotting')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, network in zip(axes, ('lan', 'wan')):
        series = sorted((r for r in rows if r['mode'] == 'retrain' and r['kd'] and not r['gelu_linearized']),
                        key=lambda r: r['latency_s'][network])
        if series:
            ax.plot([r['latency_s'][network] for r in series], [r['top1'] for r in series], '-', color='C0',
                    alpha=0.4, label='MPCViT, searched and retrained with KD')
        for r in rows:
            # blue: searched; red: MPCViT+; orange: fixed-kind baselines; hollow: no distillation
            color = 'C3' if r['gelu_linearized'] else 'C0' if r['mode'] == 'retrain' else 'C1'
            marker = 'o' if r['mode'] == 'retrain' else 's'
            hollow = r['mode'] == 'retrain' and not r['kd']
            ax.scatter(r['latency_s'][network], r['top1'], marker=marker, zorder=3, edgecolors=color,
                       facecolors='none' if hollow else color)
            ax.annotate(r['name'], (r['latency_s'][network], r['top1']), textcoords='offset points',
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f'estimated secure latency, {network.upper()} (s)')
        ax.set_ylabel('test top-1 (%)')
        ax.set_title(network.upper())
        ax.grid(alpha=0.3)
    axes[0].legend(loc='center right', fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)

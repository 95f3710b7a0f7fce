"""Model cards for published checkpoints, rendered from measured JSON with huggingface_hub's ``ModelCard``."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import get_pretrained_cfg

from ..layers.attn_kinds import BASELINE_KIND, SEARCH, get_attn_kind, list_attn_kinds
from ..utils import import_extra

__all__ = ['DATASET_CARDS', 'CARD_TEMPLATE', 'pattern_grid', 'render_card']

CARD_TEMPLATE = Path(__file__).with_name('card_template.md')
"""The one Jinja template every card is rendered from."""

DATASET_CARDS: Dict[str, Dict[str, str]] = {
    'fashion_mnist': dict(title='Fashion-MNIST', hub_id='zalando-datasets/fashion_mnist'),
    'cifar10': dict(title='CIFAR-10', hub_id='uoft-cs/cifar10'),
    'cifar100': dict(title='CIFAR-100', hub_id='uoft-cs/cifar100'),
    'tiny_imagenet': dict(title='Tiny-ImageNet', hub_id='zh-plus/tiny-imagenet'),
}
"""How a training dataset is named on a card and which Hub dataset it is."""



def _label(kind: str) -> str:
    return '?' if kind == SEARCH else get_attn_kind(kind).label


def _title(kind: str) -> str:
    return 'search (α)' if kind == SEARCH else get_attn_kind(kind).title


def pattern_grid(attn_pattern: Sequence[Any], gelu_pattern: Optional[Sequence[Any]] = None) -> str:
    """A Markdown layer x head grid of the head pattern, with the GeLU tokens kept per layer for MPCViT+.

    Args:
        attn_pattern: One entry per layer: a kind for all heads, or a list with one kind per head.
        gelu_pattern: One entry per layer: ``'gelu'``, ``'linear'`` or a 0/1 value per token (1 = GeLU).
    """
    heads = max(len(p) if isinstance(p, list) else 1 for p in attn_pattern)
    columns = [f'head {h}' for h in range(heads)] + (['GeLU tokens kept'] if gelu_pattern else [])
    lines = ['| layer | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    for layer, kinds in enumerate(attn_pattern):
        kinds = kinds if isinstance(kinds, list) else [kinds] * heads
        cells = [_label(k) for k in kinds]
        if gelu_pattern:
            g = gelu_pattern[layer]
            cells.append({'gelu': 'all', 'linear': 'none'}[g] if isinstance(g, str) else f'{int(sum(g))} / {len(g)}')
        lines.append(f'| {layer} | ' + ' | '.join(cells) + ' |')
    order = [k.name for k in list_attn_kinds()] + [SEARCH]
    used = sorted({k for p in attn_pattern for k in (p if isinstance(p, list) else [p])}, key=order.index)
    lines.append('')
    lines.append(', '.join(f'{_label(k)} = {_title(k)}' for k in used) + '.')
    return '\n'.join(lines)


def _heads_line(head_kinds: Dict[str, int]) -> str:
    total = sum(head_kinds.values())
    return ', '.join(f'{n} {_title(k)}' for k, n in head_kinds.items()) + f' (of {total})'


def _gelu_line(gelu_pattern: Optional[List[Any]]) -> str:
    if not gelu_pattern:
        return 'GeLU on every token'
    kept = sum(sum(g) if isinstance(g, list) else {'gelu': 1, 'linear': 0}[g] for g in gelu_pattern)
    total = sum(len(g) if isinstance(g, list) else 1 for g in gelu_pattern)
    return f'MPCViT+: GeLU kept on {int(kept)} of {total} layer-token positions, linear on the rest'


def _is_baseline(model: Dict[str, Any]) -> bool:
    """All heads Softmax and every GeLU exact: the model the others' secure cost is compared with."""
    return set(model['head_kinds']) == {BASELINE_KIND} and not model.get('gelu_pattern')


def _cost_rows(cost: Dict[str, Any], name: str, baseline: bool) -> List[Dict[str, str]]:
    rows = []
    for key, title in [('model', name)] + ([] if baseline else [('baseline', 'all-Softmax, exact GeLU')]):
        e = cost[key]
        rows.append(dict(name=title, rounds=str(e['rounds']), mb=f'{e["bytes"] / 1e6:.1f}',
                         compute=f'{e["compute_s"]:.2f}', lan=f'{e["latency_s"]["lan"]:.2f}',
                         wan=f'{e["latency_s"]["wan"]:.1f}', dealer_mb=f'{e["dealer"]["bytes"] / 1e6:.1f}',
                         dealer_s=f'{e["dealer"]["time_s"]:.2f}'))
    if baseline:
        return rows
    r = cost['model']['ratio_to_baseline']
    rows.append(dict(name='saving (baseline / this model)', rounds=f'{r["rounds"]:.2f}x', mb=f'{r["bytes"]:.2f}x',
                     compute=f'{r["compute"]:.2f}x', lan=f'{r["latency_lan"]:.2f}x', wan=f'{r["latency_wan"]:.2f}x',
                     dealer_mb='', dealer_s=''))
    return rows


def _networks_line(networks: Dict[str, Dict[str, float]]) -> str:
    return '; '.join(f'{n.upper()} {s["rtt_s"] * 1e3:g} ms round trip, {s["bandwidth_bps"] / 1e6:g} Mbit/s'
                     for n, s in networks.items())


def _training_text(training: Dict[str, Any]) -> str:
    how = {'train': 'Trained', 'search': 'Searched', 'retrain': 'Retrained'}.get(training['mode'], training['mode'])
    text = f'{how} for {training["epochs"]} epoch{"s" if training["epochs"] != 1 else ""}'
    if training.get('init_from'):
        text += f' from `{training["init_from"]}`'
    data = DATASET_CARDS.get(training['dataset'], {}).get('title', training['dataset'])
    subset = f'the first {training["train_subset"]:,} images of ' if training.get('train_subset') else ''
    text += (f' on {subset}the {data} training set with {training["opt"]}, learning rate {training["lr"]:g} '
             f'({training["sched"]}), batch {training["batch_size"]}, {training["precision"]}, on {training["device"]}')
    if training.get('teacher'):
        text += f', with token-level knowledge distillation from `{training["teacher"]}`'
    text += (f'. Training took {training["train_s"] / 60:.0f} minutes; the test top-1 logged at the end of training '
             f'was {training["final_top1"]:.2f}%.')
    return text


def _create_name(name: str, repo_id: str) -> str:
    """``ARCH.TAG`` where the registry's default config points at this repository, else ``hf-hub:ORG/NAME``."""
    registered = name in timm.list_pretrained(name) and get_pretrained_cfg(name).hf_hub_id == repo_id
    return name if registered else f'hf-hub:{repo_id}'


def render_card(results: Dict[str, Any], repo_id: str, create_name: Optional[str] = None) -> str:
    """The model card of a published checkpoint.

    Args:
        results: What ``results.json`` holds: ``model`` (facts of the model itself) and, where measured,
            ``dataset``, ``plain`` and ``secure`` (from ``timm-mpc eval --json``), ``training`` and ``machine``.
        repo_id: ``ORG/NAME`` of the Hub repository.
        create_name: The name to pass to ``timm.create_model`` in the usage example; ``ARCH.TAG`` if
            the registry points there, else ``hf-hub:ORG/NAME``.

    Returns:
        The card, front matter included.
    """
    model, plain, secure = results['model'], results.get('plain'), results.get('secure')
    dataset = DATASET_CARDS.get(plain['dataset']) if plain else None
    name = repo_id.split('/')[-1]
    tags = ['image-classification', 'timm', 'timm-mpc', 'mpc', 'secure-inference', 'mpcvit']
    eval_results = None
    if plain and dataset:
        eval_results = [EvalResult(task_type='image-classification', dataset_type=dataset['hub_id'],
                                   dataset_name=dataset['title'], dataset_split='test', metric_type='accuracy',
                                   metric_name='top-1 accuracy (plain text)', metric_value=round(plain['top1'], 2))]
        if secure:
            eval_results.append(EvalResult(
                task_type='image-classification', dataset_type=dataset['hub_id'], dataset_name=dataset['title'],
                dataset_split=f'test[:{secure["images"]}]', metric_type='accuracy',
                metric_name='top-1 accuracy (two-party MPC, CrypTen)', metric_value=round(secure['top1'], 2)))
    card_data = ModelCardData(
        library_name='timm', license=model.get('license', 'apache-2.0'), tags=tags, pipeline_tag='image-classification',
        datasets=[dataset['hub_id']] if dataset else None, metrics=['accuracy'], model_name=name,
        eval_results=eval_results)
    for_data = f' for {dataset["title"]}' if dataset else ''
    baseline = _is_baseline(model)
    if baseline:
        summary = (f'The all-Softmax `{model["architecture"]}` image classifier{for_data}: the baseline that the '
                   f'MPC-friendly checkpoints are searched from and distilled from, and that their secure cost is '
                   f'measured against.')
    else:
        summary = (f'An MPC-friendly `{model["architecture"]}` image classifier{for_data}: each attention head is '
                   f'{" or ".join(_title(k) for k in model["head_kinds"])}, chosen by the MPCViT search, so that '
                   f'two-party secure inference (the model owner keeps the weights, the client the image) is cheap.')
    import_extra('jinja2', 'a model card')  # huggingface_hub renders its templates with it
    card = ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE),
        name=name, summary=summary, model=model, dataset=dataset, plain=plain, secure=secure,
        heads_line=_heads_line(model['head_kinds']), gelu_line=_gelu_line(model.get('gelu_pattern')),
        grid=pattern_grid(model['attn_pattern'], model.get('gelu_pattern')),
        cost_rows=_cost_rows(secure['cost'], name, baseline) if secure else [], baseline=baseline,
        networks=_networks_line(secure['cost']['networks']) if secure else '',
        machine=results.get('machine', 'an unrecorded machine'),
        training=_training_text(results['training']) if results.get('training') else None,
        create_name=create_name or _create_name(name, repo_id))
    return str(card)

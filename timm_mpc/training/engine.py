"""The training loop shared by teacher training, MPC-aware search and (distilled) retraining, built on
timm's loaders, Mixup, optimizer and scheduler factories, losses and checkpoint saver."""
import argparse
import json
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_state_dict, resume_checkpoint
from timm.models import resolve_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, CheckpointSaver, NativeScaler, accuracy
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from tqdm import tqdm

from ..factory import builds_mpc_attention, create_mpc_model
from ..layers.attn_kinds import BASELINE_KIND, SEARCH
from ..layers.pattern_state import checkpoint_state, is_pattern_key, searched_tensors
from ..pattern import count_head_kinds, get_attn_pattern, get_gelu_pattern
from ..reader import num_weights
from ..search.binarize import searches_gelu
from ..utils import progress, save_weights
from .config import RunConfig
from .data import DATASETS, build_dataset, build_loader, model_data_config
from .losses import ArchitecturePenalty, TokenDistillationLoss

__all__ = ['TokensAndLogits', 'create_run_model', 'create_teacher', 'load_weights', 'evaluate', 'model_summary',
           'slow_amp_warning', 'train_model']


class TokensAndLogits(nn.Module):
    """Wraps a timm ViT so one call returns ``(logits, final-norm tokens)``, as distillation needs, while
    ``DistributedDataParallel`` still sees a single forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        tokens = self.model.forward_features(x)
        return self.model.forward_head(tokens), tokens


def load_weights(model: nn.Module, path: str) -> None:
    """Load the weights of a checkpoint (ours or timm's; safetensors or torch) into ``model`` but keep the
    model's own head and GeLU patterns, e.g. to start a search from a trained teacher."""
    state = {k: v for k, v in load_state_dict(path, weights_only=True).items() if not is_pattern_key(k)}
    incompatible = model.load_state_dict(state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(f'checkpoint {path} does not fit {type(model).__name__}: missing '
                         f'{incompatible.missing_keys[:4]}, unexpected {incompatible.unexpected_keys[:4]}')


def create_run_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The model a run trains: its pattern from ``cfg`` (or from the ``init_from`` checkpoint when
    ``pattern_from_init``), its weights random or from ``init_from``."""
    kwargs = dict(cfg.model_args(num_classes), drop_path_rate=cfg.drop_path)
    if cfg.init_from and cfg.pattern_from_init:
        model = create_mpc_model(cfg.model, checkpoint=cfg.init_from, **kwargs)
        if cfg.reinit_weights:  # the paper retrains the searched architecture from scratch
            model = create_mpc_model(cfg.model, attn_pattern=get_attn_pattern(model),
                                     gelu_pattern=get_gelu_pattern(model) or None, **kwargs)
        return model
    model = create_mpc_model(cfg.model, pretrained=cfg.pretrained and not cfg.init_from, attn_pattern=cfg.attn_pattern,
                             gelu_pattern=cfg.gelu_pattern, **kwargs)
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    return model


def create_teacher(cfg: RunConfig, num_classes: int, mode: str) -> Optional[nn.Module]:
    """The distillation teacher, or None (no KD).

    A timm model that ``convert_to_mpc`` converts distils from its original, unconverted architecture (timm's own
    attention: the same logits, faster): with ``cfg.teacher``'s weights, or, when retraining with ``pretrained``
    and no teacher file, the pretrained weights (``no_kd`` turns that off). An ``mpcvit_*`` model has no
    unconverted original: its teacher is an all-Softmax checkpoint, ``cfg.teacher``.
    """
    if cfg.no_kd:
        return None
    kwargs = cfg.model_args(num_classes)
    if cfg.teacher:
        teacher = create_mpc_model(cfg.model, checkpoint=cfg.teacher, **kwargs)
        if builds_mpc_attention(cfg.model) or get_gelu_pattern(teacher) or any(
                kind != BASELINE_KIND for layer in get_attn_pattern(teacher) for kind in layer):
            return teacher  # a teacher of other kinds than the original's: its converted architecture computes it
        original = timm.create_model(cfg.model, **kwargs)
        load_weights(original, cfg.teacher)
        return original
    if mode != 'retrain' or not cfg.pretrained or builds_mpc_attention(cfg.model):
        return None
    source = resolve_pretrained_cfg(cfg.model, pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if source.num_classes != num_classes:
        raise ValueError(f'the pretrained {cfg.model} classifies {source.num_classes} classes and this run '
                         f'{num_classes}: timm would give the teacher a random head. Pass --teacher FILE (a teacher run '
                         f'on this task) or --no-kd')
    return timm.create_model(cfg.model, pretrained=True, **kwargs)


def slow_amp_warning(cfg: RunConfig, device: torch.device) -> Optional[str]:
    """Why ``cfg``'s autocast would slow training down on ``device``, or None: a CPU without bfloat16 instructions
    (AVX512-BF16 or AMX) emulates bfloat16 (one run here: 14x slower than float32 per step)."""
    if not cfg.amp or device.type != 'cpu' or cfg.amp_dtype != 'bfloat16' or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f'--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bfloat16 instructions, so bfloat16 '
            'autocast is emulated and runs many times slower than float32; train without --amp here')


def _autocast(cfg: RunConfig, device: torch.device) -> Any:
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.amp_dtype))


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        cfg: Optional[RunConfig] = None,
        desc: str = 'eval',
) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%) and cross-entropy of ``model`` over ``loader``."""
    model.eval()
    top1, top5, losses = AverageMeter(), AverageMeter(), AverageMeter()
    ctx = _autocast(cfg, device) if cfg else nullcontext()
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        x, y = x.to(device), y.to(device)
        with ctx:
            logits = model(x).float()
        a1, a5 = accuracy(logits, y, topk=(1, min(5, logits.shape[-1])))
        top1.update(a1.item(), x.shape[0])
        top5.update(a5.item(), x.shape[0])
        losses.update(nn.functional.cross_entropy(logits, y).item(), x.shape[0])
    return dict(top1=top1.avg, top5=top5.avg, loss=losses.avg, images=top1.count)


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix('.part')
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def model_summary(model: nn.Module, cfg: RunConfig) -> Dict[str, Any]:
    """What a run's model is: parameters, head kinds and pattern, GeLU tokens kept, and (for fixed patterns)
    secure latency estimated from the measured per-kind cost table, or a dry run for other families."""
    summary: Dict[str, Any] = dict(
        architecture=cfg.model.split('.')[0], params=num_weights(model),
        head_kinds=count_head_kinds(model), attn_pattern=get_attn_pattern(model))
    gelu = get_gelu_pattern(model)
    if gelu:
        summary['gelu_pattern'] = gelu
    searching = SEARCH in summary['head_kinds'] or searches_gelu(model)
    if cfg.estimate_latency and not searching:
        from ..cost.pricing import model_estimate
        settings = cfg.cost_settings()
        summary['secure_estimate'] = dict(model_estimate(model, settings), engine=f'{settings.engine} {settings.protocol}')
    return summary


def _average_over_ranks(tensors: List[torch.Tensor]) -> Callable[..., None]:
    """An optimizer pre-step hook that averages the gradients of ``tensors`` over the ranks, as DDP does for
    parameters (α and β are buffers), so every rank takes the same step."""
    def hook(*_: Any) -> None:
        for tensor in tensors:
            if tensor.grad is not None:
                dist.all_reduce(tensor.grad)
                tensor.grad.div_(dist.get_world_size())
    return hook


def _train_one_epoch(
        net: nn.Module,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        epoch: int,
        num_epochs: int,
        mode: str,
        cfg: RunConfig,
        device: torch.device,
        task_loss: nn.Module,
        mixup: Optional[Mixup],
        teacher: Optional[nn.Module],
        kd_loss: Optional[TokenDistillationLoss],
        penalty: Optional[ArchitecturePenalty],
        scaler: Optional[NativeScaler],
        primary: bool,
) -> Tuple[AverageMeter, Dict[str, AverageMeter]]:
    """One pass over ``loader``; returns the average loss and the average of each loss term."""
    trained = [p for group in optimizer.param_groups for p in group['params']]
    net.train()
    losses, parts = AverageMeter(), {}
    updates_per_epoch = len(loader)
    bar = progress(loader, primary, desc=f'{mode} {epoch + 1}/{num_epochs}', dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device), y.to(device)
        if mixup is not None:
            x, y = mixup(x, y)
        with _autocast(cfg, device):
            logits, tokens = net(x)
            if kd_loss is not None:
                with torch.no_grad():
                    t_logits, t_tokens = teacher(x)
                terms = kd_loss(logits.float(), tokens, t_logits, t_tokens, y)
                loss = terms['loss']
            else:
                loss = task_loss(logits.float(), y)
                terms = dict(task=loss)
            if penalty is not None:
                terms['arch'] = penalty()
                loss = loss + terms['arch']
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch + 1} step {step}; lower the '
                                     f'learning rate (now {optimizer.param_groups[0]["lr"]:.3g}) or disable AMP')
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=cfg.clip_grad, parameters=trained)
        else:
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
            optimizer.step()
        if penalty is not None:
            penalty.clamp_()
        scheduler.step_update(num_updates=epoch * updates_per_epoch + step + 1)
        losses.update(loss.item(), x.shape[0])
        for k, v in terms.items():
            if k != 'loss':
                parts.setdefault(k, AverageMeter()).update(v.item(), x.shape[0])
        bar.set_postfix(loss=f'{losses.avg:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    return losses, parts


def train_model(cfg: RunConfig, mode: str = 'train', on_finish: Optional[Any] = None) -> Dict[str, Any]:
    """Run (or resume) a training run and return its record, also written to ``<output>/run.json``.

    Args:
        cfg: The run's settings.
        mode: ``train`` (a model with a fixed pattern, e.g. the all-Softmax teacher), ``search`` (learnable
            α and β with the architecture penalty) or ``retrain`` (a binarized pattern, with KD when
            ``cfg.teacher`` is set). The modes differ only in the model and the loss.
        on_finish: Called as ``on_finish(model, record, out_dir)`` on the primary process at the end
            (the search binarizes there).

    Output folder: ``run.json`` (settings, per-epoch metrics, final accuracy, pattern, secure estimate),
    ``model.safetensors`` (final weights with their patterns) and timm's ``last.pth.tar`` /
    ``model_best.pth.tar`` checkpoints for resuming.
    """
    if mode not in ('train', 'search', 'retrain'):
        raise ValueError(f'unknown mode {mode!r}; accepted: train, search, retrain')
    if cfg.dataset not in DATASETS and cfg.dataset != 'folder':
        raise ValueError(f'unknown dataset {cfg.dataset!r}; accepted: {list(DATASETS) + ["folder"]}')
    cost_settings = cfg.cost_settings()  # an unknown engine or protocol fails here, before the first epoch
    dist_info = init_distributed_device_so(cfg.device)
    device, rank, world = torch.device(dist_info['device']), dist_info['global_rank'], dist_info['world_size']
    primary = rank == 0
    slow_amp = slow_amp_warning(cfg, device)
    if slow_amp and primary:
        warnings.warn(slow_amp)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.output)
    if primary:
        out.mkdir(parents=True, exist_ok=True)

    num_classes = cfg.model_kwargs.get('num_classes') or DATASETS.get(cfg.dataset, {}).get('num_classes')
    if num_classes is None:  # an ImageFolder: one class per sub-folder
        num_classes = len(build_dataset(cfg.dataset, 'train', cfg.data_dir).reader.class_to_idx)
    model = create_run_model(cfg, num_classes).to(device)
    if mode == 'search' and SEARCH not in count_head_kinds(model):
        raise ValueError("a search needs a supernet: attn_pattern='search' (set for every head by default)")
    if cfg.estimate_latency or mode == 'search':  # priced at the end (a search binarizes by cost): refuse it now
        from ..cost.pricing import check_budgets, check_priceable
        check_priceable(model, cost_settings, 'search it with --engine crypten' if mode == 'search' else
                        'run without a latency estimate (--no-latency), or with --engine crypten')
        if mode == 'search':
            check_budgets(model, cost_settings, cfg.budget_s, cfg.network)
    data_config = model_data_config(model)
    in_chans = data_config['input_size'][0]
    train_set = build_dataset(cfg.dataset, 'train', cfg.data_dir, cfg.download, in_chans, cfg.train_subset)
    test_set = build_dataset(cfg.dataset, 'test', cfg.data_dir, cfg.download, in_chans, cfg.test_subset)
    aug = dict(scale=cfg.scale, hflip=cfg.hflip, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob)
    train_loader = build_loader(train_set, data_config, cfg.batch_size, True, cfg.workers, world > 1, device, **aug)
    test_loader = build_loader(test_set, data_config, cfg.batch_size, False, cfg.workers, False, device)

    teacher = create_teacher(cfg, num_classes, mode)
    if teacher is not None:
        teacher = TokensAndLogits(teacher).to(device).eval().requires_grad_(False)
    penalty = None
    if mode == 'search':
        costs = dict(head=None, token=None)
        if cfg.cost_weighted:
            from ..cost.pricing import model_head_costs
            costs = model_head_costs(model, cost_settings, cfg.network)
        penalty = ArchitecturePenalty(model, cfg.lam, cfg.lam_beta, costs['head'], costs['token'])

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    searched = searched_tensors(model)
    if searched:  # α and β are buffers (a fixed pattern has no use for them): the search optimizes them itself
        optimizer.add_param_group(dict(params=searched, weight_decay=0.0))  # the L1 penalty is their regularizer
        if world > 1:
            optimizer.register_step_pre_hook(_average_over_ranks(searched))
    scaler = NativeScaler(device=device.type) if cfg.amp and cfg.amp_dtype == 'float16' else None
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1),
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, updates_per_epoch=len(train_loader),
        step_on_epochs=False)  # warmup and decay per update: smooth for short runs too
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        task_loss: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        task_loss = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        task_loss = nn.CrossEntropyLoss()
    kd_loss = TokenDistillationLoss(task_loss, cfg.kd_alpha) if teacher is not None else None

    record: Dict[str, Any] = dict(mode=mode, config=cfg.to_dict(), world_size=world, history=[])
    start_epoch = 0
    last = out / 'last.pth.tar'
    if cfg.resume and last.is_file():
        start_epoch = resume_checkpoint(model, str(last), optimizer, scaler, log_info=False, weights_only=True) or 0
        if (out / 'run.json').is_file():
            record['history'] = json.loads((out / 'run.json').read_text()).get('history', [])[:start_epoch]
    if start_epoch:
        scheduler.step(start_epoch)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(**cfg.to_dict()), amp_scaler=scaler, checkpoint_dir=str(out),
                            recovery_dir=str(out), max_history=1) if primary else None

    net: nn.Module = TokensAndLogits(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)
    for epoch in range(start_epoch, num_epochs):
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        losses, parts = _train_one_epoch(net, train_loader, optimizer, scheduler, epoch, num_epochs, mode, cfg, device,
                                         task_loss, mixup, teacher, kd_loss, penalty, scaler, primary)
        scheduler.step(epoch + 1)
        if world > 1:
            dist.barrier()
        if not primary:
            continue
        metrics = evaluate(model, test_loader, device, cfg, desc=f'eval {epoch + 1}/{num_epochs}')
        row = dict(epoch=epoch + 1, train_loss=losses.avg,
                   **{f'train_{k}': m.avg for k, m in parts.items()},
                   lr=optimizer.param_groups[0]['lr'], test_top1=metrics['top1'], test_top5=metrics['top5'],
                   test_loss=metrics['loss'], epoch_s=time.time() - t0)
        record['history'].append(row)
        tqdm.write(f'{mode} epoch {epoch + 1}: loss {losses.avg:.4f}, test top-1 {metrics["top1"]:.2f}%')
        saver.save_checkpoint(epoch, metric=metrics['top1'])
        _write_json(out / 'run.json', record)

    if primary:
        final = record['history'][-1] if record['history'] else {}
        record['final'] = dict(test_top1=final.get('test_top1'), test_top5=final.get('test_top5'),
                               epochs=len(record['history']), test_images=len(test_set))
        save_weights(checkpoint_state(model), out / 'model.safetensors')  # first: the summary may price it at length
        record['model'] = model_summary(model, cfg)
        if on_finish is not None:
            on_finish(model, record, out)
        _write_json(out / 'run.json', record)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return record

"""Search, distillation, MPCViT+, binarization, the cost model, data and the training CLI."""
import json
import math
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import timm_mpc  # noqa: F401  (registers the models)
from timm_mpc.cli import main
from timm_mpc.data import to_model_input
from timm_mpc.hub import pattern_grid
from timm_mpc.layers.linearizable_mlp import LinearizableMlp
from timm_mpc.pattern import get_attn_pattern
from timm_mpc.cost import estimate_latency, model_cost_table
from timm_mpc.search import binarize_budget, binarize_gelu, binarize_mu
from timm_mpc.training import (
    ArchitecturePenalty, TokenDistillationLoss, build_dataset, build_loader, data as data_mod, load_runs,
)
from timm_mpc.training.data import DatasetMissingError

TINY = {'depth': 2, 'embed_dim': 32, 'num_heads': 4}


def test_token_distillation_loss_hand_computed():
    loss = TokenDistillationLoss(torch.nn.CrossEntropyLoss(), kd_alpha=0.5)
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # teacher probabilities 1/4, 3/4
    s_tok, t_tok = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    out = loss(student, s_tok, teacher, t_tok, torch.tensor([1]))
    # soft CE = -(1/4 log 1/2 + 3/4 log 1/2) = log 2; MSE = 1; hard CE = log 2
    assert out['soft'].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out['tokens'].item() == pytest.approx(1.0)
    assert out['task'].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out['loss'].item() == pytest.approx(2 * math.log(2) + 0.5, abs=1e-6)


def test_search_mode_mixes_relu_softmax_and_scaling_hand_computed():
    model = timm.create_model('mpcvit_tiny', attn_pattern='search', **TINY)
    heads = model.blocks[0].attn.heads
    heads.set_alpha(torch.tensor([0.25, 1.0, 0.0, 0.5]))
    scores = torch.tensor([1.0, -1.0]).expand(1, 4, 1, 2)
    w = heads(scores)[0, :, 0]
    # RS(s) = relu(s) / (sum relu(s) + eps) = [1, 0]; SA(s) = s / N = [0.5, -0.5]
    expected = torch.tensor([[0.25 + 0.375, -0.375], [1.0, 0.0], [0.5, -0.5], [0.75, -0.25]])
    assert torch.allclose(w, expected, atol=1e-4)


def test_mpcvit_plus_mlp_hand_computed():
    mlp = LinearizableMlp(2, 2, token_shape=(1,), gelu_pattern='search')
    with torch.no_grad():
        for fc in (mlp.fc1, mlp.fc2):
            fc.weight.copy_(torch.eye(2))
            fc.bias.zero_()
    mlp.set_beta(torch.tensor([0.5]))
    out = mlp(torch.tensor([[[-1.0, 2.0]]]))
    # h = 0.5 gelu(x) + 0.5 x; out = 0.5 relu(h) + 0.5 h
    g = F.gelu(torch.tensor([-1.0, 2.0]))
    h = 0.5 * g + 0.5 * torch.tensor([-1.0, 2.0])
    assert torch.allclose(out[0, 0], 0.5 * h.relu() + 0.5 * h)
    assert out[0, 0, 0].item() == pytest.approx(0.5 * (0.5 * -0.158655 - 0.5), abs=1e-5)
    mlp.set_pattern([0])
    assert torch.allclose(mlp(torch.tensor([[[-1.0, 2.0]]])), torch.tensor([[[0.0, 2.0]]]))


def test_architecture_penalty_and_clamp():
    model = timm.create_model('mpcvit_tiny', attn_pattern='search', gelu_pattern='search', **TINY)
    for blk, a in zip(model.blocks, ([0.5, 0.5, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0])):
        blk.attn.heads.set_alpha(torch.tensor(a))
    plain = ArchitecturePenalty(model, lam=0.1, lam_beta=0.0)
    assert plain().item() == pytest.approx(0.1 * 6.0)
    tokens = model.num_tokens
    weighted = ArchitecturePenalty(model, lam=0.1, lam_beta=0.2, head_cost=2.0, token_cost=0.5)
    # costs normalised by the larger: heads weigh 1, tokens 0.25; β = 1 on 2 layers × tokens
    assert weighted().item() == pytest.approx(0.1 * 6.0 + 0.2 * 0.25 * 2 * tokens, rel=1e-5)
    with torch.no_grad():
        plain.alphas[0].add_(0.8)
    plain.clamp_()
    assert plain.alphas[0].max().item() == 1.0 and plain.alphas[0].min().item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="attn_pattern='search'"):
        ArchitecturePenalty(timm.create_model('mpcvit_tiny', attn_pattern='softmax', **TINY))


def _table(rest=(10, 100.0, 1.0), rs=(5, 40.0, 0.5), sa=(1, 4.0, 0.05), gelu=(3, 60.0, 0.3), relu=(2, 30.0, 0.2)):
    c = lambda r, b, t: dict(rounds=r, bytes=b, time_s=t)  # noqa: E731
    return dict(shape=dict(embed_dim=4, num_heads=4), hidden_features=8, num_tokens=5,
                per_head={'relu_softmax': c(*rs), 'scaling': c(*sa), 'softmax': c(20, 90.0, 1.0), '2quad': c(*sa)},
                per_layer_activation={'gelu': c(*gelu), 'relu': c(*relu), 'quad_gelu': c(*sa)},
                per_layer_rest=c(*rest), outside=c(7, 70.0, 0.7))


def test_estimate_latency_hand_computed():
    table = _table()
    est = estimate_latency(table, [['relu_softmax', 'relu_softmax', 'scaling', 'scaling']], ['linear'])
    # outside 7 + rest 10 + RS 5 (once) + SA 1 (once) + linearized ReLU 2 rounds
    assert est['rounds'] == 25
    # bytes: 70 + 100 + 2·40 + 2·4 + ReLU 30 × (embed 4 / hidden 8)
    assert est['bytes'] == pytest.approx(70 + 100 + 80 + 8 + 15)
    assert est['time_s'] == pytest.approx(0.7 + 1.0 + 1.0 + 0.1 + 0.1)
    lan = 2.9 + 25 * 0.8e-3 + 273 * 8 / 3e9
    assert est['latency_s']['lan'] == pytest.approx(lan)
    half = estimate_latency(table, [['scaling'] * 4], [[1, 1, 0, 0, 0]])
    assert half['bytes'] == pytest.approx(70 + 100 + 16 + 60 * 0.4 + 30 * 0.6 * 0.5)


def test_binarize_mu_takes_global_top_k():
    alpha = [[0.9, 0.1, 0.5, 0.7], [0.2, 0.95, 0.3, 0.6], [0.4, 0.8, 0.05, 0.0]]
    for mu in (0.1, 0.3, 0.5, 0.7, 1.0):
        pattern = binarize_mu(alpha, mu)
        assert sum(k == 'relu_softmax' for row in pattern for k in row) == round(mu * 12)
    assert binarize_mu(alpha, 0.25) == [['relu_softmax', 'scaling', 'scaling', 'scaling'],
                                         ['scaling', 'relu_softmax', 'scaling', 'scaling'],
                                         ['scaling', 'relu_softmax', 'scaling', 'scaling']]
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        binarize_mu(alpha, 1.5)


def test_binarize_budget_respects_budget():
    table = _table()
    alpha = [[0.9, 0.1, 0.5, 0.7], [0.2, 0.95, 0.3, 0.6]]
    floor = estimate_latency(table, [['scaling'] * 4] * 2)['latency_s']['lan']
    top = estimate_latency(table, [['relu_softmax'] * 4] * 2)['latency_s']['lan']
    for budget in np.linspace(floor, top, 7):
        pattern = binarize_budget(alpha, table, float(budget))
        assert estimate_latency(table, pattern)['latency_s']['lan'] <= budget + 1e-12
    assert binarize_budget(alpha, table, top) == [['relu_softmax'] * 4] * 2
    # just enough for the first layer's best head: the 0.95 head in layer 1 comes first
    first = estimate_latency(table, [['scaling'] * 4, ['scaling', 'relu_softmax', 'scaling', 'scaling']])['latency_s']['lan']
    assert binarize_budget(alpha, table, first) == [['scaling'] * 4, ['scaling', 'relu_softmax', 'scaling', 'scaling']]
    with pytest.raises(ValueError, match='below the all-Scaling'):
        binarize_budget(alpha, table, floor * 0.5)


def test_binarize_gelu_keeps_fraction():
    beta = [[0.9, 0.1, 0.5], [0.3, 0.8, 0.2]]
    assert binarize_gelu(beta, 0.5) == [[1, 0, 1], [0, 1, 0]]
    assert sum(map(sum, binarize_gelu(beta, 1 / 3))) == 2


def test_the_pipelines_give_what_timms_transform_gives_a_user(debian_fmnist):
    """Training, evaluation and the secure examples feed a Fashion-MNIST checkpoint exactly what a user's
    resolve_data_config + create_transform make of a PIL image, pixel for pixel."""
    model = timm.create_model('mpcvit_tiny', pretrained_cfg=timm.models.get_pretrained_cfg('mpcvit_tiny.fmnist_mu50_kd'))
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg['crop_mode'] == 'border' and cfg['input_size'] == (3, 32, 32)
    user = timm.data.create_transform(**cfg)
    ds = build_dataset('fashion_mnist', 'test')
    assert len(ds) == 80 and ds.targets[:3].tolist() == [0, 1, 2]
    users = torch.stack([user(Image.fromarray(ds.data[i].numpy()).convert('RGB')) for i in range(8)])
    x, y = next(iter(build_loader(ds, cfg, batch_size=8, is_training=False, num_workers=0)))
    assert torch.equal(x, users) and torch.equal(to_model_input(ds.data[:8]), users)
    # the 28x28 image sits untouched in the middle of a border that normalizes to (about) zero
    raw = (ds.data[:8].float() / 255 - cfg['mean'][0]) / cfg['std'][0]
    assert torch.allclose(users[:, 0, 2:30, 2:30], raw, atol=1e-6)
    assert users[:, :, :2].abs().max() < 1e-2
    # training images get the same border before timm's augmentation
    train = build_dataset('fashion_mnist', 'train', subset=8)
    loader = build_loader(train, cfg, batch_size=8, is_training=True, num_workers=0)
    border, augment = loader.dataset.transform.transforms
    img = Image.fromarray(train.dataset.data[0].numpy()).convert('RGB')
    tail = timm.data.create_transform(**cfg).transforms[-2:]  # ToTensor, Normalize
    assert torch.equal(tail[1](tail[0](border(img))), user(img))
    assert next(iter(loader))[0].shape == (8, 3, 32, 32)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, 'DEBIAN_FASHION_MNIST', tmp_path / 'nowhere')
    with pytest.raises(DatasetMissingError, match='dataset-fashion-mnist'):
        build_dataset('fashion_mnist', 'train', data_dir=str(tmp_path / 'empty'))
    with pytest.raises(DatasetMissingError, match='wnids.txt'):
        build_dataset('tiny_imagenet', 'train', data_dir=str(tmp_path))
    with pytest.raises(ValueError, match='accepted'):
        build_dataset('imagenet22k', 'train')


def test_tiny_imagenet_layout(tmp_path):
    (tmp_path / 'wnids.txt').write_text('n01\nn02\n')
    for wnid in ('n01', 'n02'):
        (tmp_path / 'train' / wnid / 'images').mkdir(parents=True)
        Image.new('RGB', (64, 64)).save(tmp_path / 'train' / wnid / 'images' / f'{wnid}_0.JPEG')
    (tmp_path / 'val' / 'images').mkdir(parents=True)
    Image.new('RGB', (64, 64)).save(tmp_path / 'val' / 'images' / 'val_0.JPEG')
    (tmp_path / 'val' / 'val_annotations.txt').write_text('val_0.JPEG\tn02\t0\t0\t63\t63\n')
    train, val = build_dataset('tiny_imagenet', 'train', str(tmp_path)), build_dataset('tiny_imagenet', 'val', str(tmp_path))
    assert [t for _, t in train.samples] == [0, 1] and val.samples[0][1] == 1


def test_image_folder(tmp_path):
    for split, n in (('train', 3), ('val', 1)):
        for cls in ('cat', 'dog'):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (8, 8)).save(tmp_path / split / cls / f'{i}.png')
    train = build_dataset('folder', 'train', str(tmp_path))
    assert len(train) == 6 and train.reader.class_to_idx == {'cat': 0, 'dog': 1}
    assert len(build_dataset('folder', 'test', str(tmp_path))) == 2
    with pytest.raises(DatasetMissingError, match='one sub-folder per class'):
        build_dataset('folder', 'train', str(tmp_path / 'nothing'))


@pytest.mark.slow
def test_search_binarize_retrain_eval_pareto_end_to_end(debian_fmnist, tmp_path, capsys):
    kw = ['--model-kwargs', json.dumps(TINY), '--batch-size', '16', '--workers', '0', '--mixup', '0', '--cutmix', '0',
          '--auto-augment', 'none', '--lr', '2e-3', '--warmup-epochs', '0', '--drop-path', '0', '--hflip', '0']
    # a budget between the all-Scaling and all-ReLU-Softmax estimates, from the cost table the search will use
    table = model_cost_table(timm.create_model('mpcvit_tiny', **TINY))
    floor, top = (estimate_latency(table, [[k] * 4] * 2)['latency_s']['lan'] for k in ('scaling', 'relu_softmax'))
    budget_s = round((floor + top) / 2, 3)
    teacher = tmp_path / 'teacher'
    assert main(['train', '--output', str(teacher), '--epochs', '3', *kw]) == 0
    assert main(['search', '--output', str(tmp_path / 'search'), '--init-from', str(teacher / 'model.safetensors'),
                 '--epochs', '1', '--lam', '1e-2', '--cost-weighted', '--mu', '0.3', '0.5', '--budget-s', str(budget_s),
                 *kw]) == 0
    found = json.loads((tmp_path / 'search' / 'patterns.json').read_text())
    assert all(0 <= a <= 1 for row in found['alpha'] for a in row)
    for name, mu in (('mu30', 0.3), ('mu50', 0.5)):
        kinds = found['patterns'][name]['head_kinds']
        assert kinds.get('relu_softmax', 0) == round(mu * 2 * 4) and sum(kinds.values()) == 8
    budget = found['patterns'][f'budget_lan_{budget_s:g}s']
    assert budget['secure_estimate']['latency_s']['lan'] <= budget_s
    assert 0 < budget['head_kinds'].get('relu_softmax', 0) < 8

    out = tmp_path / 'mu50_kd'
    assert main(['retrain', '--output', str(out), '--searched', str(tmp_path / 'search' / 'mu50.safetensors'),
                 '--teacher', str(teacher / 'model.safetensors'), '--epochs', '1', *kw]) == 0
    run = json.loads((out / 'run.json').read_text())
    assert run['model']['attn_pattern'] == found['patterns']['mu50']['attn_pattern']
    assert {'train_soft', 'train_tokens', 'train_task'} <= set(run['history'][0])
    assert run['final']['test_images'] == 80
    # the pattern travels inside the checkpoint
    loaded = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')), **TINY)
    assert get_attn_pattern(loaded) == found['patterns']['mu50']['attn_pattern']

    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(out / 'model.safetensors'), '--model-kwargs', json.dumps(TINY),
                 '--workers', '0', '--json', str(tmp_path / 'eval.json')]) == 0
    assert json.loads((tmp_path / 'eval.json').read_text())['plain']['top1'] == pytest.approx(run['final']['test_top1'])
    assert main(['pareto', str(teacher), str(out), '--out', str(tmp_path / 'p.png'), '--table', str(tmp_path / 't.md')]) == 0
    assert (tmp_path / 'p.png').stat().st_size > 10_000
    assert main(['curves', str(teacher), str(out), '--out', str(tmp_path / 'c.png')]) == 0
    assert (tmp_path / 'c.png').stat().st_size > 10_000
    assert main(['curves', str(tmp_path / 'search' / 'patterns.json')]) == 2  # not a run's record: a clear error
    assert 'mu50_kd' in (tmp_path / 't.md').read_text()
    # a run recorded on another machine (its estimate priced by that machine's table) is priced again here on request
    record = json.loads((out / 'run.json').read_text())
    recorded = record['model']['secure_estimate']['latency_s']['lan']
    record['model']['secure_estimate']['latency_s'] = dict(lan=999.0, wan=999.0)
    (tmp_path / 'elsewhere').mkdir()
    (tmp_path / 'elsewhere' / 'run.json').write_text(json.dumps(record))
    assert load_runs([str(tmp_path / 'elsewhere')])[0]['latency_s']['lan'] == 999.0
    assert load_runs([str(tmp_path / 'elsewhere')], reprice=True)[0]['latency_s']['lan'] == pytest.approx(recorded)
    history = json.loads((teacher / 'run.json').read_text())['history']
    assert history[-1]['train_loss'] < history[0]['train_loss']


@pytest.mark.slow
def test_resume_continues_the_same_run(debian_fmnist, tmp_path):
    kw = ['--model-kwargs', json.dumps(TINY), '--batch-size', '32', '--workers', '0', '--mixup', '0', '--cutmix', '0',
          '--auto-augment', 'none', '--no-latency', '--train-subset', '64', '--warmup-epochs', '0']
    out = tmp_path / 'run'
    assert main(['train', '--output', str(out), '--epochs', '1', *kw]) == 0
    first = json.loads((out / 'run.json').read_text())['history']
    assert main(['train', '--output', str(out), '--epochs', '2', *kw]) == 0
    history = json.loads((out / 'run.json').read_text())['history']
    assert [h['epoch'] for h in history] == [1, 2] and history[0] == first[0]


def test_search_gelu_needs_keep_fraction(debian_fmnist, tmp_path, capsys):
    assert main(['search', '--output', str(tmp_path / 's'), '--search-gelu', '--model-kwargs', json.dumps(TINY)]) == 2
    assert '--gelu-keep' in capsys.readouterr().err


@pytest.mark.slow
def test_distributed_data_parallel_with_torchrun(debian_fmnist, tmp_path):
    """Two CPU processes (gloo) under torchrun, as timm trains on several GPUs: each takes half the data. A search
    (MPCViT+), so α and β, buffers that DDP does not average, train too."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    build_dataset('fashion_mnist', 'train')  # fills $TIMM_MPC_CACHE from the test's files for the subprocesses
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           '-m', 'timm_mpc', 'search', '--search-gelu', '--gelu-keep', '0.5', '--lam', '1e-2',
           '--output', str(out), '--epochs', '1', '--batch-size', '16', '--workers', '0',
           '--mixup', '0', '--cutmix', '0', '--auto-augment', 'none', '--no-latency',
           '--model-kwargs', json.dumps(dict(TINY, depth=1))]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / 'run.json').read_text())
    assert run['world_size'] == 2 and len(run['history']) == 1
    assert 'search 1/1' in proc.stderr and '10/10' in proc.stderr  # 320 images / 2 processes / batch 16
    found = json.loads((out / 'patterns.json').read_text())
    assert any(a != 1.0 for row in found['alpha'] for a in row) and any(b != 1.0 for row in found['beta'] for b in row)


@pytest.mark.slow
def test_progress_bars_follow_tqdm_environment_and_hide_on_other_ranks(capsys):
    """A rank other than the first never shows a bar; TQDM_DISABLE=1 hides them all (tqdm reads it at import, so in
    a fresh process)."""
    import os
    import subprocess
    import sys
    from timm_mpc.utils import progress
    list(progress(range(3), True, desc='first rank'))
    list(progress(range(3), False, desc='other rank'))
    shown = capsys.readouterr().err
    assert 'first rank: 100%' in shown and 'other rank' not in shown
    code = 'from timm_mpc.utils import progress; list(progress(range(3), True, desc="first rank"))'
    done = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, TQDM_DISABLE='1'),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and 'rank' not in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_the_recipe_on_your_own_timm_vit_end_to_end(debian_fmnist, tmp_path, capsys):
    """The own-ViT example of docs/training.md on a tiny configuration: vit_tiny_patch16_224 at 32×32 on Fashion-MNIST, a
    teacher run of the same architecture, the search, μ = 0.5, retraining with distillation from the teacher,
    evaluation in plain text and under MPC, publishing to a folder and loading it back the timm way."""
    vit = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)  # the classes: the dataset's, then the weights'
    model = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', json.dumps(vit)]
    kw = [*model, '--batch-size', '16', '--workers', '0', '--mixup', '0', '--cutmix', '0', '--auto-augment', 'none',
          '--warmup-epochs', '0', '--drop-path', '0', '--train-subset', '256', '--test-subset', '64', '--no-latency']
    teacher = tmp_path / 'teacher'
    assert main(['train', '--output', str(teacher), '--epochs', '2', *kw]) == 0
    assert main(['search', '--output', str(tmp_path / 'search'), '--init-from', str(teacher / 'model.safetensors'),
                 '--epochs', '1', '--mu', '0.5', *kw]) == 0
    out = tmp_path / 'mu50_kd'
    assert main(['retrain', '--output', str(out), '--searched', str(tmp_path / 'search' / 'mu50.safetensors'),
                 '--teacher', str(teacher / 'model.safetensors'), '--epochs', '1', *kw]) == 0
    run = json.loads((out / 'run.json').read_text())
    assert run['model']['head_kinds'] == {'relu_softmax': 3, 'scaling': 3}
    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(out / 'model.safetensors'), *model, '--workers', '0', '--test-subset',
                 '64', '--secure-images', '4', '--calibration-images', '16', '--no-latency',
                 '--json', str(tmp_path / 'eval.json')]) == 0
    measured = json.loads((tmp_path / 'eval.json').read_text())
    assert measured['plain']['top1'] == pytest.approx(run['final']['test_top1'])
    assert measured['secure']['agreement'] == 100.0 and measured['secure']['images'] == 4
    assert measured['plain']['images'] == 64 and '--json' not in measured['plain']['command']
    assert measured['secure']['cost']['baseline']['heads'] == {'softmax': 6}
    folder = tmp_path / 'published'
    assert main(['publish', str(out / 'model.safetensors'), *model, '--repo', 'me/vit_tiny_patch16_224.fmnist_mu50_kd',
                 '--results', str(tmp_path / 'eval.json'), '--dry-run', str(folder)]) == 0
    # the measuring command's JSON (plain and secure accuracy, secure cost) becomes the card's figures
    card, results = (folder / 'README.md').read_text(), json.loads((folder / 'results.json').read_text())
    assert results['plain'] == measured['plain'] and results['secure'] == measured['secure']
    assert f'| Plain text, float32 | {measured["plain"]["top1"]:.2f} |' in card
    assert f'| {measured["secure"]["cost"]["model"]["rounds"]} |' in card and measured['plain']['command'] in card
    assert pattern_grid(run['model']['attn_pattern'], run['model'].get('gelu_pattern')) in card
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    trained = timm_mpc.create_mpc_model('vit_tiny_patch16_224', checkpoint=str(out / 'model.safetensors'), **vit).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained(images))
    assert get_attn_pattern(loaded) == run['model']['attn_pattern']


@pytest.mark.slow
def test_a_converted_timm_model_starts_from_pretrained_weights_and_distils_from_its_unconverted_original(tmp_path):
    """--pretrained loads timm's pretrained weights (here a local file through timm's pretrained_cfg, as the Hub's
    would be) into the converted model; the teacher is the original architecture with timm's own attention."""
    from dataclasses import replace
    from safetensors.torch import save_file
    from timm.layers import Attention
    from timm_mpc.layers.pattern_state import checkpoint_state
    from timm_mpc.training import RunConfig
    from timm_mpc.training.engine import create_run_model, create_teacher
    from timm_mpc.utils import save_weights
    torch.manual_seed(0)
    arch = dict(patch_size=8, depth=1, embed_dim=48, num_heads=3)
    original = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=10, **arch).eval()
    with torch.no_grad():
        original.head.weight.normal_(0, 1)
        original.cls_token.normal_(0, 1)
    save_file(original.state_dict(), str(tmp_path / 'pretrained.safetensors'))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(images)
    cfg = RunConfig(model='vit_tiny_patch16_224', pretrained=True, img_size=32, attn_pattern='softmax',
                    model_kwargs=dict(arch, pretrained_cfg_overlay=dict(file=str(tmp_path / 'pretrained.safetensors'),
                                                                        num_classes=10)))  # else timm drops the head
    model = create_run_model(cfg, 10).eval()
    teacher = create_teacher(cfg, 10, 'retrain').eval()
    assert type(teacher.blocks[0].attn) is Attention and type(model.blocks[0].attn) is not Attention
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5) and torch.equal(teacher(images), expected)
    # the pretrained original is the default teacher of a retraining only, and --no-kd turns it off
    assert create_teacher(cfg, 10, 'train') is None and create_teacher(replace(cfg, no_kd=True), 10, 'retrain') is None
    # a teacher file (a converted all-Softmax run's weights) goes into the unconverted original too
    save_weights(checkpoint_state(model), tmp_path / 'teacher.safetensors')
    from_file = create_teacher(replace(cfg, pretrained=False, teacher=str(tmp_path / 'teacher.safetensors')), 10,
                               'train').eval()
    assert type(from_file.blocks[0].attn) is Attention
    with torch.no_grad():
        assert torch.allclose(from_file(images), expected, atol=1e-5)
    # a teacher file of other kinds keeps them: its converted architecture computes it
    timm_mpc.set_attn_pattern(model, 'relu_softmax')
    save_weights(checkpoint_state(model), tmp_path / 'relu_teacher.safetensors')
    relu_teacher = create_teacher(replace(cfg, teacher=str(tmp_path / 'relu_teacher.safetensors')), 10, 'train')
    assert timm_mpc.count_head_kinds(relu_teacher) == {'relu_softmax': 3}
    # a pretrained original with another class count would teach with a random head: refused
    with pytest.raises(ValueError, match=r'classifies 10 classes and this run 7: .*--teacher FILE .* or --no-kd'):
        create_teacher(cfg, 7, 'retrain')
    # --img-size builds the model at another size; timm resamples the pretrained position embedding
    bigger = create_run_model(replace(cfg, img_size=48), 10)
    assert bigger.patch_embed.img_size == (48, 48) and bigger.pos_embed.shape[1] == 1 + 36


@pytest.mark.slow
def test_a_swin_is_searched_priced_by_dry_runs_and_evaluated_with_its_estimate(debian_fmnist, tmp_path, capsys):
    """The per-kind cost table prices ViT-shaped models only; a Swin is priced by dry runs of itself (CrypTen):
    searched with the cost-weighted penalty, binarized by mu, each pattern's estimate exact in rounds."""
    from timm_mpc.secure import SecureSettings, build_secure_plan
    from timm_mpc.secure.crypten.dry_run import dry_run
    swin = dict(img_size=32, window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=8)
    kw = ['--model', 'swin_tiny_patch4_window7_224', '--model-kwargs', json.dumps(swin), '--batch-size', '16',
          '--workers', '0', '--mixup', '0', '--cutmix', '0', '--auto-augment', 'none', '--warmup-epochs', '0',
          '--train-subset', '32', '--test-subset', '16']
    search = tmp_path / 'search'
    # what cannot be priced is refused before the first epoch: SPU has no dry run
    capsys.readouterr()
    assert main(['search', '--output', str(search), '--epochs', '1', '--engine', 'spu', *kw]) == 2
    assert re.search(r'SwinTransformer is priced by a dry run, which the SPU engine has not', capsys.readouterr().err)
    assert not search.exists() or not list(search.iterdir())
    assert main(['search', '--output', str(search), '--epochs', '1', '--cost-weighted', '--mu', '0.5', *kw]) == 0
    found = json.loads((search / 'patterns.json').read_text())['patterns']['mu50']
    assert found['head_kinds'].get('relu_softmax', 0) == round(0.5 * 3) and sum(found['head_kinds'].values()) == 3
    estimate = found['secure_estimate']
    assert estimate['priced_by'] == 'dry run' and estimate['latency_s']['wan'] > estimate['latency_s']['lan'] > 0
    model = timm_mpc.create_mpc_model('swin_tiny_patch4_window7_224', checkpoint=str(search / 'mu50.safetensors'),
                                      **swin).eval()
    settings = SecureSettings()
    assert estimate['rounds'] == dry_run(build_secure_plan(model, settings), settings, 1).rounds
    capsys.readouterr()
    assert main(['eval', '--model', 'swin_tiny_patch4_window7_224', '--model-kwargs', json.dumps(swin), '--checkpoint',
                 str(search / 'mu50.safetensors'), '--workers', '0', '--test-subset', '16',
                 '--json', str(tmp_path / 'eval.json')]) == 0
    summary = json.loads((tmp_path / 'eval.json').read_text())['model']
    assert summary['secure_estimate']['rounds'] == estimate['rounds']
    # a latency budget: each candidate pattern priced by its own dry run; the same search again (same seed). A dry
    # run's seconds include measured compute, and this Swin's patterns differ by less than a loaded machine's noise,
    # so the budget is far above the floor and only exact figures are compared (the search itself refuses a
    # pattern whose estimate exceeds the budget)
    budget_s = round(estimate['latency_s']['lan'] * 4, 3)
    assert main(['search', '--output', str(tmp_path / 'budget'), '--epochs', '1', '--mu', '0.5', '--budget-s',
                 str(budget_s), *kw]) == 0
    patterns = json.loads((tmp_path / 'budget' / 'patterns.json').read_text())['patterns']
    within = patterns[f'budget_lan_{budget_s:g}s']
    assert within['secure_estimate']['priced_by'] == 'dry run' and sum(within['head_kinds'].values()) == 3
    assert within['secure_estimate']['rounds'] > 0 and within['secure_estimate']['bytes'] > 0




def test_bfloat16_autocast_on_a_cpu_without_bfloat16_instructions_is_warned_about(monkeypatch):
    from timm_mpc.training.config import RunConfig
    from timm_mpc.training.engine import slow_amp_warning
    cpu = torch.device('cpu')
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert 'no bfloat16 instructions' in slow_amp_warning(RunConfig(amp=True), cpu)
    assert slow_amp_warning(RunConfig(amp=False), cpu) is None
    assert slow_amp_warning(RunConfig(amp=True), torch.device('cuda')) is None  # only the CPU emulates it
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert slow_amp_warning(RunConfig(amp=True), cpu) is None


@pytest.mark.slow
def test_a_search_budget_below_the_models_least_cost_is_refused_before_the_first_epoch(debian_fmnist, tmp_path, capsys):
    table = model_cost_table(timm.create_model('mpcvit_tiny', **TINY))
    floor = estimate_latency(table, [['scaling'] * 4] * 2)['latency_s']['lan']  # every head Scaling
    out = tmp_path / 'search'
    args = ['search', '--output', str(out), '--epochs', '1', '--model-kwargs', json.dumps(TINY), '--workers', '0',
            '--batch-size', '16', '--train-subset', '32', '--test-subset', '16', '--mu', '0.5']
    assert main([*args, '--budget-s', str(round(floor * 2, 3)), str(round(floor / 2, 3))]) == 2
    err = capsys.readouterr().err
    assert f'[{round(floor / 2, 3)}] s (lan) are below the least this model can cost' in err
    assert not (out / 'run.json').exists() and not (out / 'last.pth.tar').exists()  # no epoch ran

"""Hub publishing: repository folders, round trips through local-dir:, an offline Hub cache and a loopback
Hub, model cards rendered from measured JSON, and the checkpoints shipped in the repository."""
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import timm_mpc  # noqa: F401  (registers the models)
from timm_mpc import PretrainedWeightsError, convert_to_mpc, get_attn_pattern, get_gelu_pattern
from timm_mpc.cli import main
from timm_mpc.data import example_images
from timm_mpc.hub import HUB_FILES, model_facts, pattern_grid, publish, render_card, save_for_hub, seed_hub_cache
from timm_mpc.layers import MPCAttention, QuadGELU
from timm_mpc.layers.pattern_state import checkpoint_state
from timm_mpc.utils import save_weights

from hub_server import LoopbackHub

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / 'checkpoints' / 'timm-mpc'
DEFAULT = 'mpcvit_tiny.fmnist_mu50_kd'  # the default tag's checkpoint
TINY = dict(depth=2, embed_dim=32, num_heads=4)
PATTERN = [['relu_softmax', 'scaling', 'scaling', 'relu_softmax'], ['scaling', 'scaling', 'scaling', 'relu_softmax']]


def _mpcvit(gelu: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    gelu_pattern = [[1] * 40 + [0] * 25, 'linear'] if gelu else None
    return timm.create_model('mpcvit_tiny', attn_pattern=PATTERN, gelu_pattern=gelu_pattern, **TINY).eval()


def _converted_vit(**convert_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=10)
    return convert_to_mpc(vit, [['relu_softmax', 'scaling', '2quad'], 'scaling'], **convert_kwargs).eval()


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a(_images()), b(_images()))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    full_env.update(env)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize('gelu', [False, True], ids=['mpcvit', 'mpcvit_plus'])
def test_publish_folder_loads_back_through_local_dir(tmp_path, gelu):
    model = _mpcvit(gelu)
    folder = save_for_hub(model, tmp_path / 'org' / 'mpcvit_tiny.test', 'org/mpcvit_tiny.test',
                          label_names=[f'class {i}' for i in range(10)])
    assert sorted(p.name for p in folder.iterdir()) == sorted(HUB_FILES)  # safetensors only, nothing left over
    assert not list(tmp_path.glob('org/.*'))
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'mpcvit_tiny' and config['num_classes'] == 10
    assert config['model_args']['attn_pattern'] == PATTERN and config['model_args']['depth'] == 2
    assert ('gelu_pattern' in config['model_args']) == gelu
    assert config['label_names'][3] == 'class 3' and config['pretrained_cfg']['tag'] == 'test'

    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert _same(model, loaded)
    assert get_attn_pattern(loaded) == PATTERN and get_gelu_pattern(loaded) == get_gelu_pattern(model)
    assert loaded.pretrained_cfg['label_names'][3] == 'class 3'
    # the pattern also travels in the weights, so loading them into the default model gives the same model
    plain_cfg = timm.create_model('mpcvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(
        file=str(folder / 'model.safetensors')), **TINY).eval()
    assert _same(model, plain_cfg)


def test_cli_publish_dry_run_matches_source_exactly(tmp_path, capsys):
    model = _mpcvit(gelu=True)
    save_weights(checkpoint_state(model), tmp_path / 'trained.safetensors')
    out = tmp_path / 'repo'
    assert main(['publish', str(tmp_path / 'trained.safetensors'), '--repo', 'me/mpcvit_tiny.mine', '--dry-run',
                 str(out), '--model-kwargs', json.dumps(TINY)]) == 0
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert _same(model, loaded)
    assert load_file(out / 'model.safetensors').keys() == checkpoint_state(model).keys()
    card = (out / 'README.md').read_text()
    assert 'library_name: timm' in card and 'hf-hub:me/mpcvit_tiny.mine' in card
    assert 'No accuracy was measured' in card


def test_converted_vit_round_trip(tmp_path):
    vit = _converted_vit(act_layer='quad_gelu')
    folder = save_for_hub(vit, tmp_path / 'vit', 'me/vit_tiny_mpc')
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert config['model_args']['attn_layer'] == 'mpc' and config['model_args']['act_layer'] == 'quad_gelu'
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert _same(vit, loaded)
    assert get_attn_pattern(loaded) == get_attn_pattern(vit)
    assert all(type(m) is MPCAttention for m in loaded.modules() if hasattr(m, 'qkv'))
    assert all(isinstance(b.mlp.act, QuadGELU) for b in loaded.blocks)


CONVERTED = {  # timm builds none of these with MPC modules from its own arguments
    'eva02': lambda: (convert_to_mpc(_timm('eva02_tiny_patch14_224', 28, depth=2),
                                     [['relu_softmax', 'scaling', 'softmax'], ['2quad', 'scaling', 'scaling']]), 28),
    'swin': lambda: (convert_to_mpc(_timm('swin_tiny_patch4_window7_224', 56, depths=(2, 2), num_heads=(2, 4),
                                          embed_dim=32), ['scaling', ['relu_softmax', 'softmax'], 'scaling',
                                                          ['softmax', 'relu_softmax', '2quad', 'scaling']]), 56),
    'vit_mpcvit_plus': lambda: (_converted_vit(gelu_pattern=[[1, 0] * 8 + [1], 'linear']), 32),
    'vit_mpcvit_plus_all_gelu': lambda: (_converted_vit(gelu_pattern='gelu'), 32),  # its MLPs are still MPCViT+'s
    'vit_relu_eps': lambda: (_converted_vit(relu_eps=1e-3), 32),
}


def _timm(name, size, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=size, num_classes=10, **kwargs).eval()


@pytest.mark.parametrize('family', list(CONVERTED))
def test_converted_models_timm_cannot_build_publish_as_mpc_converted_and_load_back(tmp_path, family):
    model, size = CONVERTED[family]()
    folder = save_for_hub(model, tmp_path / 'repo', 'me/x')
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'mpc_converted' and config['model_args']['base'] == model.pretrained_cfg['architecture']
    assert config['model_args']['attn_pattern'] == get_attn_pattern(model)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert type(loaded) is type(model) and get_attn_pattern(loaded) == get_attn_pattern(model)
    assert get_gelu_pattern(loaded) == get_gelu_pattern(model)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    again = save_for_hub(loaded, tmp_path / 'again', 'me/x')  # a loaded-back model publishes the same way
    assert json.loads((again / 'config.json').read_text())['model_args'] == config['model_args']
    assert load_file(again / 'model.safetensors').keys() == load_file(folder / 'model.safetensors').keys()


def test_mpc_converted_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match=r"mpc_converted needs base=<a registered timm architecture>, got 'nope'"):
        timm.create_model('mpc_converted', base='nope')
    with pytest.raises(ValueError, match='builds MPC attention itself'):
        timm.create_model('mpc_converted', base='mpcvit_tiny')
    with pytest.raises(ValueError, match='does not build features_only models'):
        timm.create_model('mpc_converted', base='vit_tiny_patch16_224', features_only=True)


@pytest.mark.parametrize('make, match', [
    (lambda: timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1), 'no MPC attention'),
])
def test_unpublishable_models_are_refused_before_writing(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        save_for_hub(make(), tmp_path / 'out', 'me/x')
    assert not (tmp_path / 'out').exists() and not list(tmp_path.iterdir())


def test_a_folder_in_the_way_is_refused_before_anything_is_written(tmp_path):
    folder = save_for_hub(_mpcvit(), tmp_path / 'repo', 'me/mpcvit_tiny.x')
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    (folder / 'README.md').unlink()
    (folder / 'README.md').mkdir()
    with pytest.raises(ValueError, match=r'README.md is in the way'):
        save_for_hub(_mpcvit(gelu=True), folder, 'me/mpcvit_tiny.x')
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != 'README.md'}  # nothing new beside the old files
    assert sorted(p.name for p in tmp_path.iterdir()) == ['repo']  # and no temporary folder left


def test_bad_repo_ids_and_missing_token(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match='ORG/NAME'):
        publish(_mpcvit(), 'no-org', dry_run_dir=tmp_path / 'x')
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(sys.modules['timm_mpc.hub.publish'], 'get_token', lambda: None)  # no stored login
    with pytest.raises(RuntimeError, match='HF_TOKEN'):
        publish(_mpcvit(), 'me/model')
    with pytest.raises(ValueError, match='config.json'):
        seed_hub_cache(tmp_path)


def _download_logits(repo: str, hub: LoopbackHub, tmp_path: Path) -> torch.Tensor:
    """Logits of ``hf-hub:repo`` loaded by timm in a fresh process whose Hub is the loopback one."""
    torch.save(_images(), tmp_path / 'images.pt')
    proc = _run_python(f'''
        import timm, torch, timm_mpc
        model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'images.pt')!r})), {str(tmp_path / 'logits.pt')!r})
        ''', HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / 'cache'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / 'logits.pt')


@pytest.mark.slow
def test_upload_and_download_through_loopback_hub(tmp_path):
    """publish() in this process (huggingface_hub sends small repos' files inside the commit here, since it
    would use Xet for LFS files), then an hf-hub: download through timm: identical logits."""
    model = _mpcvit(gelu=True)
    repo = 'me/mpcvit_tiny.loopback'
    with LoopbackHub(token='hf_test') as hub:
        url = publish(model, repo, token='hf_test', endpoint=hub.endpoint, results=dict(machine='the test machine'))
        assert repo in url
        assert set(HUB_FILES) <= set(hub.files(repo))  # plus the .gitattributes every new Hub repo starts with
        logits = _download_logits(repo, hub, tmp_path)
        assert any(method == 'GET' and 'model.safetensors' in path for method, path in hub.requests)
    with torch.no_grad():
        assert torch.equal(logits, model(_images()))
    snapshot = next((tmp_path / 'cache' / 'models--me--mpcvit_tiny.loopback' / 'snapshots').iterdir())
    assert (snapshot / 'config.json').is_file() and (snapshot / 'model.safetensors').is_file()


@pytest.mark.slow
def test_cli_upload_with_token_from_env_goes_through_lfs(tmp_path):
    """`timm-mpc publish` with HF_TOKEN and HF_ENDPOINT set, as a user runs it; without Xet, the weights take
    the Hub's LFS path (batch API, upload, verify) and the commit points at them."""
    model = _mpcvit()
    save_weights(checkpoint_state(model), tmp_path / 'w.safetensors')
    repo = 'me/mpcvit_tiny.cli'
    with LoopbackHub(token='hf_cli', lfs=True) as hub:
        proc = _run_python(f'''
            from timm_mpc.cli import main
            raise SystemExit(main(['publish', {str(tmp_path / 'w.safetensors')!r}, '--model-kwargs', {json.dumps(TINY)!r},
                                   '--repo', {repo!r}]))
            ''', HF_ENDPOINT=hub.endpoint, HF_TOKEN='hf_cli', HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'home'))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert 'uploaded' in proc.stdout and 'model.safetensors' in hub.repos[repo][-1].lfs
        assert any('lfs/objects/batch' in path for _, path in hub.requests)
        logits = _download_logits(repo, hub, tmp_path)
    with torch.no_grad():
        assert torch.equal(logits, model(_images()))


def test_pattern_grid_by_hand():
    grid = pattern_grid([['softmax', 'scaling'], 'relu_softmax'], [[1, 0, 1], 'linear'])
    assert grid.splitlines() == [
        '| layer | head 0 | head 1 | GeLU tokens kept |',
        '|---|---|---|---|',
        '| 0 | SM | SC | 2 / 3 |',
        '| 1 | RS | RS | none |',
        '',
        'SM = Softmax, RS = ReLU-Softmax, SC = Scaling.',
    ]


# The checkpoints shipped in the repository, in the published layout

SHIPPED_FOLDERS = sorted(SHIPPED.iterdir()) if SHIPPED.is_dir() else []


def test_every_published_tag_is_shipped_with_its_card():
    tags = [t for t in timm.list_pretrained('mpcvit_*') if timm.models.get_pretrained_cfg(t).hf_hub_id]
    assert f"mpcvit_tiny.{timm.models.get_pretrained_cfg('mpcvit_tiny').tag}" == DEFAULT
    assert sorted(f.name for f in SHIPPED_FOLDERS) == sorted(tags)
    assert sorted(p.stem for p in (ROOT / 'hub_cards').glob('*.md') if p.stem != 'README') == sorted(tags)


@pytest.mark.parametrize('folder', SHIPPED_FOLDERS, ids=lambda f: f.name)
def test_shipped_card_is_rendered_from_its_json(folder):
    results = json.loads((folder / 'results.json').read_text())
    card = render_card(results, f'timm-mpc/{folder.name}')
    assert (folder / 'README.md').read_text() == card == (ROOT / 'hub_cards' / f'{folder.name}.md').read_text()
    assert sorted(p.name for p in folder.iterdir()) == sorted(HUB_FILES)
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert model_facts(model) == results['model']
    assert results['plain']['images'] == 10000 and results['secure']['images'] >= 100
    assert f'timm-mpc eval --model {folder.name}' in results['plain']['command']
    assert pattern_grid(results['model']['attn_pattern'], results['model'].get('gelu_pattern')) in card


def test_republishing_a_shipped_folder_keeps_its_card_and_weights(tmp_path):
    folder = SHIPPED / 'mpcvit_tiny.fmnist_plus_mu50_kd'
    out = tmp_path / 'again'
    assert main(['publish', str(folder), '--repo', f'timm-mpc/{folder.name}', '--dry-run', str(out)]) == 0
    for name in HUB_FILES:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.slow
def test_offline_cache_loads_the_default_checkpoint_by_every_name(tmp_path):
    cache = tmp_path / 'hub'
    assert main(['seed-cache', *map(str, SHIPPED_FOLDERS), '--cache-dir', str(cache)]) == 0
    default = SHIPPED / DEFAULT
    proc = _run_python(f'''
        import timm, torch, timm_mpc
        from timm_mpc.cli import build_parser
        from timm_mpc.command_args import resolve_model
        from timm_mpc.data import example_images
        images, _ = example_images()
        names = ['mpcvit_tiny', '{DEFAULT}', 'hf-hub:timm-mpc/{DEFAULT}',
                 'local-dir:{default}']
        models = {{n: timm.create_model(n, pretrained=True).eval() for n in names}}
        models['timm-mpc predict --pretrained'] = resolve_model(build_parser().parse_args(['predict', '--pretrained']))
        with torch.no_grad():
            torch.save({{n: m(images) for n, m in models.items()}}, {str(tmp_path / 'out.pt')!r})
        ''', HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.load(tmp_path / 'out.pt')
    first = logits.pop('mpcvit_tiny')
    assert all(torch.equal(first, other) for other in logits.values()), list(logits)
    _, labels = example_images()
    reference = json.loads((ROOT / 'tests' / 'reference' / f'{DEFAULT}_logits.json').read_text())
    assert reference['labels'] == labels.tolist()
    assert torch.allclose(first, torch.tensor(reference['logits']), atol=1e-5, rtol=0)


def test_the_cards_usage_snippet_gives_the_default_checkpoints_reference_logits():
    """The card's own snippet, as a user runs it: resolve_data_config + create_transform on each shipped test image as
    a PIL image gives the logits recorded when the default checkpoint was published (and measured on its card)."""
    model = timm.create_model(f'local-dir:{SHIPPED / DEFAULT}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    raw = torch.load(Path(timm_mpc.data.__file__).with_name('fashion_mnist_test8.pt'), weights_only=True)
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.fromarray(img.numpy()).convert('RGB')) for img in raw['images']]))
    reference = json.loads((ROOT / 'tests' / 'reference' / f'{DEFAULT}_logits.json').read_text())
    assert reference['labels'] == raw['labels'].tolist()
    assert torch.allclose(logits, torch.tensor(reference['logits']), atol=1e-5, rtol=0)


class _NotOnThisHub(http.server.BaseHTTPRequestHandler):
    """A Hub that answers, without the repository (as the real one does until the checkpoints are uploaded)."""

    def do_HEAD(self):
        self.send_response(404)
        self.send_header('X-Error-Code', 'RepoNotFound')
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.mark.slow
@pytest.mark.parametrize('hub', ['unreachable', 'offline', 'unreachable, cached', 'without the repository'])
def test_without_the_hub_the_published_weights_come_from_the_cache_or_the_checkout(tmp_path, hub):
    """The two-command quick start: where the Hub cannot give the weights (its host does not answer, HF_HUB_OFFLINE,
    or it answers without the repository) and the cache is empty, `pretrained=True` reads the checkout's shipped
    copy, saying so in one line; a cached copy is read without the minute of retries huggingface_hub spends on an
    unreachable host."""
    cache = tmp_path / 'hub'
    cache.mkdir()
    if 'cached' in hub:
        seed_hub_cache(SHIPPED / DEFAULT, cache_dir=cache)
    server = None
    if hub == 'without the repository':
        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _NotOnThisHub)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = dict(HF_HUB_CACHE=str(cache), HF_ENDPOINT=f'http://127.0.0.1:{server.server_address[1]}')
    else:
        env = dict(HF_HUB_CACHE=str(cache), **({'HF_HUB_OFFLINE': '1'} if hub == 'offline' else
                                                {'HF_ENDPOINT': 'http://127.0.0.1:9'}))  # a closed port: refused
    proc = _run_python(f'''
        import timm, torch, timm_mpc
        from timm_mpc.data import example_images
        with torch.no_grad():
            torch.save(timm.create_model('mpcvit_tiny', pretrained=True).eval()(example_images()[0]), {str(tmp_path / 'out.pt')!r})
        ''', **env)
    if server is not None:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    notice = [line for line in proc.stderr.splitlines() if 'Hugging Face Hub cannot give' in line]
    source = cache if 'cached' in hub else SHIPPED / DEFAULT
    assert len(notice) == 1 and str(source) in notice[0], proc.stderr[-2000:]
    reference = json.loads((ROOT / 'tests' / 'reference' / f'{DEFAULT}_logits.json').read_text())
    assert torch.allclose(torch.load(tmp_path / 'out.pt'), torch.tensor(reference['logits']), atol=1e-5, rtol=0)


def test_corrupt_weights_in_a_folder_are_refused(tmp_path):
    folder = save_for_hub(_mpcvit(), tmp_path / 'repo', 'me/mpcvit_tiny.x')
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedWeightsError, match='corrupt or truncated'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_republishing_a_folder_with_new_figures_keeps_its_training_record(tmp_path):
    """Re-measured figures (--results, without the training run at hand) replace the measured sections only."""
    folder = SHIPPED / 'mpcvit_tiny.fmnist_plus_mu50_kd'
    kept = json.loads((folder / 'results.json').read_text())
    secure = {**kept['secure'], 'images': 1000, 'agreement': 100.0, 'max_abs_error': 0.01}
    remeasured = tmp_path / 'eval.json'
    remeasured.write_text(json.dumps({'plain': kept['plain'], 'secure': secure, 'machine': kept['machine']}))
    out = tmp_path / 'again'
    assert main(['publish', str(folder), '--repo', f'timm-mpc/{folder.name}', '--dry-run', str(out),
                 '--results', str(remeasured)]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['training'] == kept['training'] and results['secure'] == secure
    assert '1000' in (out / 'README.md').read_text().replace(',', '')

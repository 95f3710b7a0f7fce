"""The timm-mpc command line."""
import subprocess
import sys

import pytest

from timm_mpc.cli import main

from party_spy import secret_file


def test_info_lists_models_kinds_and_families(capsys):
    assert main(['info']) == 0
    out = capsys.readouterr().out
    for text in ('mpcvit_tiny', 'mpcvit_small', 'fmnist_mu50_kd', 'relu_softmax', '2quad', 'quad_gelu', 'swin_*'):
        assert text in out


def test_convert_reports_changes_and_softmax_keeps_outputs(capsys):
    assert main(['convert', 'vit_tiny_patch16_224', '--pattern', 'softmax']) == 0
    out = capsys.readouterr().out
    assert 'attention modules converted: 12' in out and "{'softmax': 36}" in out
    change = float(out.split('max |logit change| ')[1].split(',')[0])
    assert change <= 1e-5
    assert main(['convert', 'vit_tiny_patch16_224', '--pattern', '["scaling"]',
                 '--act-layer', 'quad_gelu']) == 2  # a one-layer list for a 12-layer model
    assert 'list of 12 layer patterns' in capsys.readouterr().err


@pytest.mark.slow
def test_convert_writes_weights_that_predict_runs_with_their_pattern(tmp_path, capsys):
    """convert --output, then the printed predict command on those weights: the pattern travels in the file, and
    the shipped examples are made the model's input (its size, its mean and std)."""
    import json
    import shlex
    kwargs = json.dumps(dict(img_size=32, patch_size=8, depth=2, num_heads=3, num_classes=10))
    out = tmp_path / 'vit.safetensors'
    for bad in (str(tmp_path / 'vit.pt'), str(tmp_path / 'missing' / 'vit.safetensors')):
        assert main(['convert', 'vit_tiny_patch16_224', '--model-kwargs', kwargs, '--output', bad]) == 2
        assert 'accepted is a .safetensors file in an existing folder' in capsys.readouterr().err
    assert main(['convert', 'vit_tiny_patch16_224', '--model-kwargs', kwargs, '--pattern', 'mu50',
                 '--gelu-pattern', json.dumps(['gelu', 'linear']), '--output', str(out)]) == 0
    printed = capsys.readouterr().out.split('run it with: ')[1].strip()
    assert out.exists() and printed.startswith('timm-mpc predict vit_tiny_patch16_224 --checkpoint')
    argv = shlex.split(printed)[1:] + ['--batch', '2', '--json', str(tmp_path / 'p.json')]
    assert main(argv) == 0
    run = json.loads((tmp_path / 'p.json').read_text())
    assert run['accuracy']['top1_agreement'] == 1.0 and run['accuracy']['max_abs_error'] < 2e-2
    import timm_mpc
    loaded = timm_mpc.create_mpc_model('vit_tiny_patch16_224', checkpoint=str(out), gelu_pattern=['gelu', 'linear'],
                                       **json.loads(kwargs))
    assert timm_mpc.count_head_kinds(loaded) == {'relu_softmax': 3, 'scaling': 3}


def test_unsupported_model_is_an_error_not_a_traceback(capsys):
    assert main(['convert', 'resnet18']) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-mpc convert: error:') and 'ResNet' in err and 'Nothing was changed' in err


@pytest.mark.slow
def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, '-m', 'timm_mpc', 'info'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and 'mpcvit_tiny' in result.stdout


def test_malformed_files_and_options_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a tensor file')
    text = tmp_path / 'text.json'
    text.write_text('{"mode": "search"')  # cut short
    import torch
    torch.save({'pictures': torch.zeros(1)}, tmp_path / 'dict.pt')
    cases = [
        (['predict', '--images', str(bad)], f'--images {bad} is not a tensor file written by torch.save'),
        (['predict', '--images', str(tmp_path / 'missing.pt')], 'missing.pt: no such file'),
        (['predict', '--images', str(tmp_path / 'dict.pt')], "holds a dict with keys ['pictures']; accepted"),
        (['predict', '--model-kwargs', '{"depth": 2'], '--model-kwargs is not valid JSON'),
        (['predict', '--model-kwargs', '[2]'], '--model-kwargs must be a JSON object'),
        (['predict', '--model-kwargs', '{"bogus": 1}'], 'cannot be built with these arguments'),
        (['predict', '--timeout', 'inf'], 'timeout_s must be a number of seconds in (0, 86400]'),
        (['publish', str(bad), '--repo', 'me/x', '--run', str(text), '--dry-run', str(tmp_path / 'out')],
         f'--run file {text} is not valid JSON'),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err, (argv, err)
    for batch in ('0', '-1', 'two'):
        with pytest.raises(SystemExit):
            main(['predict', '--batch', batch])
        assert 'expected a whole number of at least 1' in capsys.readouterr().err


@pytest.mark.parametrize('command', ['predict', 'party'])
@pytest.mark.parametrize('flags, match', [
    (['--bandwidth-mbps', '0'], r'network lan: bandwidth 0 Mbit/s; accepted: more than 0'),
    (['--rtt-ms', '-5'], r'network lan: round-trip time -5 ms; accepted: 0 ms or more'),
    (['--network', 'wan', '--bandwidth-mbps', 'nan'], r'network wan: bandwidth nan Mbit/s'),
])
def test_network_options_are_refused_before_anything_runs(capsys, command, flags, match):
    import re
    args = ['party', '--rank', '1', '--rendezvous', 'tcp://127.0.0.1:1', '--secret-file', secret_file()] \
        if command == 'party' else ['predict']
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and 'Traceback' not in err, err


def test_images_of_another_float_dtype_run_as_float32(tmp_path):
    import torch
    from timm_mpc.secure.commands import _load_images
    torch.save(torch.rand(2, 3, 32, 32, dtype=torch.float64), tmp_path / 'images.pt')
    images = _load_images(str(tmp_path / 'images.pt'))
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)

"""The timm-mpc command line."""
import subprocess
import sys

import pytest

from timm_mpc.cli import main


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


def test_unsupported_model_is_an_error_not_a_traceback(capsys):
    assert main(['convert', 'resnet18']) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-mpc convert: error:') and 'ResNet' in err and 'Nothing was changed' in err


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

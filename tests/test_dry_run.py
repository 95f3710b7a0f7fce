"""The dry run before a secure run: the cost estimate it prints, and the memory bound it predicts (real processes)."""
import pytest
import torch

from timm_mpc.cli import main
from timm_mpc.secure import MemoryBoundError, SecureSettings, parse_memory, secure_predict
from timm_mpc.secure.crypten.dry_run import dry_run
from timm_mpc.secure.crypten.dry_run import predicted_peak
from timm_mpc.secure.plan import build_secure_plan

from small_models import MIXED, random_images, small_mpcvit

@pytest.fixture(scope='module')
def model():
    return small_mpcvit(attn_pattern=MIXED)


def _images(n):
    return random_images(n)


@pytest.mark.slow
def test_the_estimate_printed_before_a_run_is_what_the_run_costs(model, capsys, tmp_path, monkeypatch):
    """The dry run (zeros, the owner's own two processes) predicts the rounds and bytes of the real run exactly,
    and says so before the parties start."""
    monkeypatch.setenv('TIMM_MPC_CACHE', str(tmp_path))
    result = secure_predict(model, _images(3), return_result=True)
    estimate = result.estimate
    assert estimate.batch == 3
    assert (estimate.rounds, estimate.bytes) == (result.profile.rounds, result.profile.bytes)
    assert 0 < estimate.dealer_bytes <= result.profile.dealer['bytes']  # its answers; the owner's requests besides
    out = capsys.readouterr().err
    line = out[:out.index('secure inference:')]  # printed before the progress bar of the parties
    assert f'secure inference of 3 images, batches of 3: {estimate.rounds:,} rounds per batch of 3' in line
    assert 'LAN' in line and 'WAN' in line and 'peak memory about' in line
    # both parties' processes measured: the weights shared, then more during the inference
    assert all(0 < base <= peak for base, peak in zip(estimate.base_rss, estimate.peak_rss))
    assert result.predicted_peak == predicted_peak(estimate, dealer=True) > sum(estimate.peak_rss)
    assert list((tmp_path / 'dry_runs').glob('*.json')), 'the dry run is cached on disk'


@pytest.mark.slow
def test_max_memory_chooses_the_largest_batch_that_fits(model, tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_MPC_CACHE', str(tmp_path))
    plan = build_secure_plan(model, SecureSettings())
    settings = SecureSettings()
    two, three = (predicted_peak(dry_run(plan, settings, b), dealer=True) for b in (2, 3))
    assert two < three
    images = _images(5)
    result = secure_predict(model, images, return_result=True, max_memory=(two + three) // 2)
    assert result.estimate.batch == 2 and result.predicted_peak == two
    with torch.no_grad():
        plain = model(images)
    assert result.logits.shape == (5, 10) and (result.logits - plain).abs().max() < 2e-2


@pytest.mark.slow
def test_a_batch_that_cannot_fit_is_refused_before_the_parties_start(model, tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_MPC_CACHE', str(tmp_path))
    from timm_mpc.secure import launch
    started = []
    monkeypatch.setattr(launch, 'run_local_parties', lambda *a, **k: started.append(a))
    with pytest.raises(MemoryBoundError, match=r'one image needs about \d+\.\d\d GiB of memory \(owner, client and '
                                               r'dealer processes together\), more than the bound of 0\.10 GiB'):
        secure_predict(model, _images(2), max_memory='0.1GiB')
    two = predicted_peak(dry_run(build_secure_plan(model, SecureSettings()), SecureSettings(), 2), dealer=True)
    with pytest.raises(MemoryBoundError, match=r'a batch of 2 images needs about .* more than the bound '
                                               r'\(max_memory\) of .*choose a smaller batch_size'):
        secure_predict(model, _images(2), max_memory=two - 1, batch_size=2)
    # a batch of 64 beyond the bound is refused on the line through 1 and 2 images: no dry run of 64
    from timm_mpc.secure.crypten.dry_run import _cache_key, default_cache_dir
    with pytest.raises(MemoryBoundError, match=r'a batch of 64 images needs about .* more than the bound'):
        secure_predict(model, _images(64), max_memory=two, batch_size=64)
    key = _cache_key(build_secure_plan(model, SecureSettings()), SecureSettings(), 2)
    assert (default_cache_dir() / f'{key}.json').exists()  # where the dry runs are cached (the one of 2 images)
    key = _cache_key(build_secure_plan(model, SecureSettings()), SecureSettings(), 64)
    assert not (default_cache_dir() / f'{key}.json').exists()
    assert not started
    with pytest.raises(ValueError, match='max_memory is predicted by a dry run, which the SPU engine has not'):
        secure_predict(model, _images(2), engine='spu', max_memory='8GiB')


def test_memory_sizes():
    assert parse_memory('6GiB') == 6 * 2 ** 30 and parse_memory('6gb') == 6 * 10 ** 9
    assert parse_memory('512 MiB') == 512 * 2 ** 20 and parse_memory(' 1.5G ') == 1_500_000_000
    assert parse_memory(4096) == 4096
    for bad in ('6 gigs', '-1GiB', '0', 0, True, 'GiB', None):
        with pytest.raises(ValueError, match=r"is not a size; accepted: a positive number of bytes, or a number with "
                                             r"a unit such as 6GiB"):
            parse_memory(bad)


def test_cli_max_memory_is_checked_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        main(['predict', '--max-memory', '6 gigs'])
    assert "argument --max-memory: memory bound '6 gigs' is not a size" in capsys.readouterr().err

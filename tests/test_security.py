"""What a semi-honest model owner can learn, tested as an attacker would: the real owner, client and dealer
processes run unchanged, the owner's process records everything it holds (tests/party_spy.py), and the
attacks below search that record for the client's image and logits.

The attacks: the best affine reconstruction of the client's patches from any recorded tensor or the sum or
difference of any two (mod 2^64); the logits the same way, and also through the owner's own head weights
applied to a reconstructed head input; and any logit value held anywhere, encoded. The insecure
owner-as-dealer setting is run through the same attacks, to show that they find a leak where there is one.
"""
import re

import pytest
import torch

from party_spy import (DEVIATIONS, best_reconstruction, held_values, record_view, recovered_values,
                       run_deviating_owner, run_parties_with_limits, run_spied_parties)
from timm_mpc.data import calibration_examples
from timm_mpc.secure import SecureSettings, build_secure_plan
from timm_mpc.secure.secure_vit import patchify

from small_models import MIXED, small_mpcvit

pytestmark = pytest.mark.slow  # real party processes


@pytest.fixture(scope='module')
def model():
    return small_mpcvit(embed_dim=32, attn_pattern=MIXED)


def _images(model, batch):
    images = calibration_examples(model)
    return images.flip(0)[:batch]  # not the owner's calibration images in the same order


def _owner_view(model, images, provider, tmp_path):
    settings = SecureSettings(provider=provider, timeout_s=60)
    plan = build_secure_plan(model, settings)
    state = plan.owner_weights(model)
    run_spied_parties(plan, state, images, settings.to_dict(), str(tmp_path))
    return torch.load(tmp_path / 'owner_view.pt'), torch.load(tmp_path / 'client_logits.pt')


def _through_owner_head(model):
    """The attacker's own computation: its head weights applied to a reconstructed head input."""
    weight, bias = model.head.weight.double(), model.head.bias.double()
    classes, dim = weight.shape

    def head(x):  # x: (combinations, batch · dim)
        return (x.view(x.shape[0], -1, dim) @ weight.t() + bias).flatten(1)
    return head, dim


def _attacks(model, images, view, logits):
    patches = patchify(images, model.patch_embed.patch_size)
    head, dim = _through_owner_head(model)
    batch = images.shape[0]
    return dict(
        image=best_reconstruction(view, patches),
        image_chance=best_reconstruction(view, torch.randn(patches.shape, generator=torch.Generator().manual_seed(3))),
        logits_direct=recovered_values(view, logits, tolerance=0.05),
        logits_via_head=recovered_values(view, logits, tolerance=0.05, transform=head, source_numel=batch * dim),
        logits_held=held_values(view, logits),
    )


def test_default_owner_learns_nothing_and_owner_as_dealer_learns_everything(model, tmp_path):
    images = _images(model, 2)
    with torch.no_grad():
        plain = model(images)

    view, logits = _owner_view(model, images, 'TTP', tmp_path)  # the default: a dealer outside both parties
    assert (logits - plain).abs().max() < 0.05 and len(view) > 1000  # it ran, and the owner saw a lot
    found = _attacks(model, images, view, logits)
    print('default (TTP):', found)
    # no better than chance: a random target of the same size correlates as well with the view
    assert found['image'] < max(0.3, 1.5 * found['image_chance']), found
    assert found['logits_direct'] == found['logits_via_head'] == found['logits_held'] == 0, found

    view, logits = _owner_view(model, images, 'TFP_INSECURE', tmp_path)  # the owner deals its own triples
    found = _attacks(model, images, view, logits)
    print('owner as dealer (TFP_INSECURE):', found)
    assert found['image'] > 0.999, found  # x = (x - a) + a: the client's patches, to one fixed-point step
    assert found['logits_via_head'] == 1.0, found  # the head's input, then the owner's own head: every logit
    assert found['logits_held'] == 0, found  # the reveal itself still leaves nothing at the owner


@pytest.mark.parametrize('deviation', list(DEVIATIONS))
def test_a_deviating_owner_cannot_read_the_clients_draws_through_the_dealer(model, tmp_path, deviation):
    """An owner that asks the dealer for anything but the plan's requests (each way of reading the client's draws
    that CrypTen's dealer allowed) is caught before the client shares its images: the client stops with a clear
    error, the dealer serves nothing and exits non-zero, and the owner's record holds nothing of the image."""
    from timm_mpc.secure.launch import dealer_requests
    images = _images(model, 1)
    settings = SecureSettings(timeout_s=60)
    plan = build_secure_plan(model, settings)
    requests = dealer_requests(plan, settings, 1, None)
    codes = run_deviating_owner(plan, plan.owner_weights(model), images, settings.to_dict(), requests,
                                str(tmp_path), deviation)
    errors = {role: (tmp_path / f'{role}_error.txt').read_text() for role in ('owner', 'client', 'dealer')}
    assert codes == [2, 2, 2], (codes, errors)
    if deviation in ('private_function', 'oversized'):  # refused by the dealer on its form: the client is told why
        assert 'the dealer refused the owner\'s requests before serving any' in errors['client'], errors
    else:  # well-formed, off the plan: the client finds the digest differs
        assert 'requests that this plan does not make' in errors['client'], errors
        assert 'the client found that the owner\'s requests differ from its plan' in errors['dealer'], errors
    assert 'the client stopped before sharing its images' in errors['owner'], errors
    view = torch.load(tmp_path / 'owner_view.pt')
    patches = patchify(images, model.patch_embed.patch_size)
    chance = best_reconstruction(view, torch.randn(patches.shape, generator=torch.Generator().manual_seed(3)))
    assert best_reconstruction(view, patches) < max(0.3, 1.5 * chance)


@pytest.mark.parametrize('batch', [1, 8])
def test_owner_holds_no_logit_after_the_reveal(model, tmp_path, batch):
    images = _images(model, batch)
    view, logits = _owner_view(model, images, 'TTP', tmp_path)
    assert logits.shape == (batch, model.num_classes)
    assert held_values(view, logits) == 0
    assert recovered_values(view, logits, tolerance=0.05) == 0


def _reveal_party(rank, rendezvous, method, values, out_dir):
    import os

    from timm_mpc.secure.crypten_compat import import_crypten
    from timm_mpc.secure.party import reveal_to
    view = record_view() if rank == 0 else None
    os.environ.update(RENDEZVOUS=rendezvous, WORLD_SIZE='2', RANK=str(rank), DISTRIBUTED_BACKEND='gloo')
    crypten = import_crypten()
    crypten.cfg.mpc.provider = 'TFP'  # no multiplication here: no dealer needed
    crypten.init()
    x = crypten.cryptensor(values if rank == 1 else torch.zeros_like(values), src=1)
    if method == 'crypten':
        x.get_plain_text(dst=1)
    else:
        reveal_to(x, 1, crypten.communicator.get())
    crypten.uninit()
    if view is not None:
        torch.save(view.records, f'{out_dir}/view.pt')


@pytest.mark.parametrize('method, leaks', [('crypten', True), ('timm_mpc', False)])
def test_the_spy_sees_crypten_reduce_reveal_leak_and_not_timm_mpc_reveal(tmp_path, method, leaks):
    """CrypTen's get_plain_text(dst=client) runs gloo's reduce, which leaves the non-receiving party a fully
    reduced chunk (about half of the values); timm-mpc's point-to-point reveal leaves it nothing."""
    from timm_mpc.secure.launch import free_port
    from timm_mpc.secure.local_run import process_context
    values = torch.randn(8, 10, generator=torch.Generator().manual_seed(5))
    values = torch.round(values * 2 ** 16) / 2 ** 16  # exactly encodable
    rendezvous = f'tcp://127.0.0.1:{free_port()}'
    ctx = process_context()
    procs = [ctx.Process(target=_reveal_party, args=(r, rendezvous, method, values, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    held = held_values(torch.load(tmp_path / 'view.pt'), values)
    assert (held >= 0.4) if leaks else (held == 0), held


@pytest.mark.parametrize('limits, batch_size, match', [
    (dict(max_batch_size=2), None, 'a batch of 3 images; the owner accepts at most 2 per batch'),
    (dict(max_images=2), 1, '3 images; the owner accepts at most 2 per run'),
    (dict(max_memory=2 ** 20), 1, r"a batch of 1 images would need about [\d.]+ GiB of the owner's memory; its bound is "
                                  r"0.00 GiB"),
])
def test_the_owner_refuses_batches_beyond_its_bounds_before_any_dry_run(model, tmp_path, limits, batch_size, match):
    """A client announcing more than the owner accepts (per batch, per run, or in memory) is refused with the figure
    before the owner dry-runs that size or anything is shared; the dealer ends with an error too."""
    from timm_mpc.secure.dry_run import _cache_key, default_cache_dir
    images = _images(model, 3)
    settings = SecureSettings(timeout_s=60)
    plan = build_secure_plan(model, settings)
    codes = run_parties_with_limits(plan, plan.owner_weights(model), images, settings.to_dict(), limits,
                                    str(tmp_path), batch_size)
    errors = {role: (tmp_path / f'{role}_error.txt').read_text() for role in ('owner', 'client', 'dealer')}
    assert codes == [2, 2, 2], (codes, errors)
    assert 'the owner refused the client\'s batches before any work' in errors['client'], errors
    assert re.search(match, errors['client']) and re.search(match, errors['owner']), errors
    assert 'the owner stopped the protocol after a failure' in errors['dealer'], errors
    assert not (default_cache_dir() / f'{_cache_key(plan, settings, 3)}.json').exists()  # no dry run of the batch

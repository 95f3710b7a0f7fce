"""What each process of a run can learn, tested as an attacker would: the real owner, client and dealer
processes run unchanged, each records everything it holds (tests/party_spy.py), and the attacks below search the
owner's record for the client's image and logits, the client's for the weights, and read what the dealer received.
A deviating owner plays against the real client and dealer; strangers (another secret, another address) try to
join; a client announces more than the owner accepts.

The attacks: the best affine reconstruction of the client's patches from any recorded tensor or the sum or
difference of any two (mod 2^64); the logits the same way, and also through the owner's own head weights
applied to a reconstructed head input; and any logit value held anywhere, encoded. The insecure
owner-as-dealer setting is run through the same attacks, to show that they find a leak where there is one.
"""
import json
import re

import pytest
import torch

from party_spy import (DEVIATIONS, SESSION_SPY, best_reconstruction, held_values, load_view, record_view, recovered_values,
                       run_deviating_owner, run_parties_with_limits, run_spied_parties, run_with_secrets)
from timm_mpc.data import calibration_examples
from timm_mpc.secure import SecureSettings, build_secure_plan
from timm_mpc.secure.admission import MAC_BYTES, NONCE_BYTES, new_secret
from timm_mpc.secure.crypten.dealer import _TERMINATE, PRODUCT_OPS
from timm_mpc.secure.secure_vit import patchify

from small_models import MIXED, small_mpcvit

pytestmark = pytest.mark.slow  # real party processes


# the fraction of the logits that one reconstruction must match (to 0.05) to count as found: the best of the
# thousands of candidates in a record matches a value or two of ten by chance (the owner's own small values); a
# leak matches them all (the owner-as-dealer run below: 1.0)
CHANCE_MATCH = 0.5


@pytest.fixture(scope='module')
def model():
    # logits that vary with the image by about 0.5 (pooled patch tokens, a head of trained-like scale): an attack that
    # matches them to 0.05 found what the owner could not guess from its own model (with the class token of a random
    # model the logits hardly depend on the image, and a vector of the owner's own weights matched 7 of 10)
    model = small_mpcvit(embed_dim=32, attn_pattern=MIXED, global_pool='avg')
    with torch.no_grad():
        model.head.weight.mul_(10)
    return model


def _images(model, batch):
    images = calibration_examples(model)
    return images.flip(0)[:batch]  # not the owner's calibration images in the same order


def _owner_view(model, images, provider, tmp_path, **settings):
    settings = SecureSettings(provider=provider, timeout_s=60, **settings)
    plan = build_secure_plan(model, settings)
    state = plan.owner_weights(model)
    run_spied_parties(plan, state, images, settings.to_dict(), str(tmp_path))
    return load_view(tmp_path / 'owner_view.pt').records, torch.load(tmp_path / 'client_logits.pt')


def _chance(view, target):
    """How well the attack fits a random target of ``target``'s size: what it finds in noise."""
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    return best_reconstruction(view, noise)


def _dealer_messages(received):
    """What the dealer received, read as its protocol: the admission's fixed-size messages (uint8) and framed JSON
    messages; anything else apart. (It sends the parties their generators' seeds.)"""
    admission, messages, other = [], [], []
    for dtype, data in received:
        if dtype == 'frame':
            messages.append('terminate' if data == _TERMINATE else json.loads(data.decode()))
        elif dtype == 'torch.uint8':
            admission.append(len(data))
        else:
            other.append((dtype, len(data)))
    return admission, messages, other


def _only_names_and_sizes(request):
    """A dealer request as the protocol makes one: [function, device, args, kwargs] where the args are shapes (lists of
    whole numbers) and a product's name, and the kwargs names and numbers: no value of any tensor."""
    function, device, args, kwargs = request
    shapes = [a for a in args if isinstance(a, list)]
    if function in ('mask', 'fixed'):  # weight_masks: a weight's number, then shapes (and matmul)
        function, args = 'additive', args[1:] if isinstance(args[0], int) and 0 <= args[0] < 2 ** 31 else args
    if function == 'sign':  # fss_comparisons: a shape, a bit width and the low bits it drops
        function, args = 'square', args[:1] if all(isinstance(a, int) and 0 <= a <= 64 for a in args[1:]) else args
    return (function in ('additive', 'square', 'binary', 'wraps', 'B2A') and device in ('cpu', None)
            and all(isinstance(a, list) or a in PRODUCT_OPS for a in args)
            and all(isinstance(v, int) and 0 <= v < 2 ** 31 for shape in shapes for v in shape)
            and all(isinstance(v, (int, str, bool)) for v in kwargs.values()))


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


def _client_and_dealer_learn_nothing(model, images, tmp_path):
    """The client's view of the run: its own patches (the attack works on this record), none of the weights; the
    dealer's: the admission and requests of names and sizes only."""
    client = load_view(tmp_path / 'client_view.pt').records
    assert best_reconstruction(client, patchify(images, model.patch_embed.patch_size)) > 0.999
    state = build_secure_plan(model, SecureSettings()).owner_weights(model)
    weights = {name: w.flatten(1) for name, w in state.items()  # each kind of matrix once: patches, first block, head
               if w.dim() >= 2 and w.numel() >= 64 and (not name.startswith('blocks.') or name.startswith('blocks.0.'))}
    assert len(weights) >= 6, list(weights)
    found = {name: (max(best_reconstruction(client, w), best_reconstruction(client, w.t())), _chance(client, w))
             for name, w in weights.items()}
    print('client, weight and chance:', found)
    assert all(got < max(0.3, 1.5 * chance) for got, chance in found.values()), found

    admission, messages, other = _dealer_messages(load_view(tmp_path / 'dealer_view.pt').received)
    assert other == [], other
    assert admission == [NONCE_BYTES, 1 + MAC_BYTES] * 2  # the dealer answers the owner's, then the client's
    commits = [m['commit'] for m in messages if isinstance(m, dict) and 'commit' in m]
    assert commits and all(_only_names_and_sizes(r) for call in commits for r in call), commits[0][:3]
    assert all(m == 'terminate' or set(m) <= {'commit', 'serve', 'accepted'} for m in messages), messages[:5]
    return commits


def test_with_weights_masked_once_and_fss_comparisons_the_parties_and_dealer_still_learn_nothing(model, tmp_path):
    """weight_masks: the client now receives each weight's difference from its session mask (once), and each
    product opens only activations; fss_comparisons: each comparison opens its input plus the dealer's mask, and both
    parties hold the dealer's keys (the owner's records hold its key, its mask shares and every opened value). The
    same attacks on the same records find nothing more."""
    images = _images(model, 2)
    with torch.no_grad():
        plain = model(images)
    view, logits = _owner_view(model, images, 'TTP', tmp_path, weight_masks=True, fss_comparisons=True, gelu='spline')
    assert (logits - plain).abs().max() < 0.05 and len(view) > 1000
    found = _attacks(model, images, view, logits)
    print('owner, weight_masks and fss_comparisons:', found)
    assert found['image'] < max(0.3, 1.5 * found['image_chance']), found
    assert max(found['logits_direct'], found['logits_via_head']) < CHANCE_MATCH and found['logits_held'] == 0, found
    commits = _client_and_dealer_learn_nothing(model, images, tmp_path)
    functions = [r[0] for r in commits[0]]
    assert {'mask', 'fixed', 'additive', 'sign'} <= set(functions)  # the masks and the comparison keys were in use
    assert 'binary' not in functions  # no comparison by CrypTen's binary shares was left


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
    assert max(found['logits_direct'], found['logits_via_head']) < CHANCE_MATCH and found['logits_held'] == 0, found

    _client_and_dealer_learn_nothing(model, images, tmp_path)

    # the owner and the dealer listened on loopback only (the addresses they were given); the client listened nowhere
    for role in ('owner', 'dealer'):
        listening = load_view(tmp_path / f'{role}_view.pt').listening
        assert listening and all(a.startswith('127.0.0.1:') for a in listening), (role, listening)
    assert load_view(tmp_path / 'client_view.pt').listening == []

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
    view = load_view(tmp_path / 'owner_view.pt').records
    patches = patchify(images, model.patch_embed.patch_size)
    chance = best_reconstruction(view, torch.randn(patches.shape, generator=torch.Generator().manual_seed(3)))
    assert best_reconstruction(view, patches) < max(0.3, 1.5 * chance)


def _reveal_party(rank, rendezvous, method, values, out_dir):
    from timm_mpc.secure.crypten.compat import import_crypten, start_crypten
    from timm_mpc.secure.crypten.ops import reveal_to
    from timm_mpc.secure.links import connect_links, parse_rendezvous
    view = record_view() if rank == 0 else None
    crypten = import_crypten()
    crypten.cfg.mpc.provider = 'TFP'  # no multiplication here: no dealer needed
    start_crypten(crypten, connect_links(rank, 2, parse_rendezvous(rendezvous), None, None, 60), 2, lambda: None)
    x = crypten.cryptensor(values if rank == 1 else torch.zeros_like(values), src=1)
    if method == 'open_to_both':
        x.get_plain_text()
    elif method == 'crypten_to_client':
        x.get_plain_text(dst=1)
    else:
        reveal_to(x, 1, crypten.communicator.get())
    crypten.uninit()
    if view is not None:
        torch.save(view.records, f'{out_dir}/view.pt')


@pytest.mark.parametrize('method, leaks', [('open_to_both', True), ('crypten_to_client', False),
                                           ('timm_mpc', False)])
def test_the_spy_sees_a_value_opened_to_the_owner_and_none_opened_to_the_client(tmp_path, method, leaks):
    """The owner's record holds every value opened to both parties (the positive control), and none of those opened
    to the client alone: by CrypTen's get_plain_text(dst=client), point to point over the links (over gloo it was a
    ring reduce that left the owner about half of the values), or by timm-mpc's reveal."""
    from timm_mpc.secure.launch import free_port
    from timm_mpc.secure.processes import process_context
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
    assert (held == 1.0) if leaks else (held == 0), held


@pytest.mark.parametrize('limits, batch_size, match', [
    (dict(max_batch_size=2), None, 'a batch of 3 images; the owner accepts at most 2 per batch'),
    (dict(max_images=2), 1, '3 images; the owner accepts at most 2 per run'),
    (dict(max_memory=2 ** 20), 1, r"a batch of 1 images would need about [\d.]+ GiB of the owner's memory; its bound is "
                                  r"0.00 GiB"),
])
def test_the_owner_refuses_batches_beyond_its_bounds_before_any_dry_run(model, tmp_path, limits, batch_size, match):
    """A client announcing more than the owner accepts (per batch, per run, or in memory) is refused with the figure
    before the owner dry-runs that size or anything is shared; the dealer ends with an error too."""
    from timm_mpc.secure.crypten.dry_run import _cache_key, default_cache_dir
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


@pytest.mark.parametrize('stranger', ['client', 'dealer'])
def test_a_process_without_the_runs_secret_is_refused_before_anything_is_shared(model, tmp_path, stranger):
    """A client or a dealer that does not hold the run's secret is refused by the owner (and, for a dealer, by the
    client too) at admission, before the settings, the plan or any share is sent, and learns that it was refused."""
    secret = new_secret()
    secrets = [new_secret() if role == stranger else secret for role in ('owner', 'client', 'dealer')]
    settings = SecureSettings(timeout_s=60)
    plan = build_secure_plan(model, settings)
    codes = run_with_secrets(plan, plan.owner_weights(model), _images(model, 1), settings.to_dict(), str(tmp_path),
                             secrets)
    errors = {role: (tmp_path / f'{role}_error.txt').read_text() for role in ('owner', 'client', 'dealer')}
    assert codes == [2, 2, 2], (codes, errors)
    refused = f'the {stranger} did not prove that it holds this run\'s secret: refused before anything was shared'
    assert refused in errors['owner'], errors
    assert 'refused this party\'s proof of the run\'s secret before anything was shared' in errors[stranger], errors
    if stranger == 'dealer':  # the client's own admission of the dealer, which it reaches once the owner's is done
        assert 'the dealer' in errors['client'], errors
    assert not any('Traceback' in e for e in errors.values()), errors


def test_a_process_that_dials_another_address_of_the_owners_host_is_not_let_in(model, tmp_path):
    """The owner listens on the rendezvous address only: a client that dials the same port at another address of
    the same host (127.0.0.2, loopback too; torch's own store listens on every address) meets no one."""
    secret = new_secret()
    settings = SecureSettings(timeout_s=8)
    plan = build_secure_plan(model, settings)
    codes = run_with_secrets(plan, plan.owner_weights(model), _images(model, 1), settings.to_dict(), str(tmp_path),
                             [secret] * 3, client_host='127.0.0.2')
    errors = {role: (tmp_path / f'{role}_error.txt').read_text() for role in ('owner', 'client', 'dealer')}
    assert codes == [2, 2, 2], (codes, errors)
    assert re.search(r'could not meet the other party and the dealer at tcp://127\.0\.0\.2:\d+ within 8 s',
                     errors['client']), errors
    assert 'could not meet the other party and the dealer at tcp://127.0.0.1' in errors['owner'], errors


def test_the_owner_of_a_session_learns_nothing_over_its_calls(model, tmp_path, monkeypatch):
    """The spy in the owner's process of a SecureSession, over two calls with different images (one, then a batch of
    seven): the attacks find neither call's patches nor logits in everything it held, and no logit at all."""
    from timm_mpc.secure import SecureSession, launch
    (tmp_path / 'session_spy.py').write_text(SESSION_SPY.format(out=str(tmp_path)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(launch, 'kind_modules', lambda: ('session_spy',))  # imported by each party process
    images = _images(model, 8)
    calls = [slice(0, 1), slice(1, 8)]
    with SecureSession(model, SecureSettings(timeout_s=60)) as session:
        logits = torch.cat([session.predict(images[call]) for call in calls])
    with torch.no_grad():
        assert (logits - model(images)).abs().max() < 0.05
    view = load_view(tmp_path / 'owner_view.pt').records
    assert len(view) > 1000
    for call in calls:
        found = _attacks(model, images[call], view, logits[call])
        assert found['image'] < max(0.3, 1.5 * found['image_chance']), (call, found)
        assert max(found['logits_direct'], found['logits_via_head']) < CHANCE_MATCH, (call, found)
        assert found['logits_held'] == 0, (call, found)

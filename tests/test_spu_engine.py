"""The SPU engine: the plan's one forward on SPU, two real processes over SPU's link (brpc) on loopback.

CHEETAH (dealer-free) runs a tiny model; SEMI2K (the owner deals: cost only) a small one. SPU's OT setup and
per-operation programs make even tiny CHEETAH runs take tens of seconds on two cores.
"""
import time
import warnings

import pytest
import timm
import torch

from timm_mpc.cli import main
from timm_mpc.secure import InsecureSettingWarning, SecureSettings, secure_predict
from timm_mpc.secure.admission import new_secret
from timm_mpc.secure.engines import ENGINES, get_engine
from timm_mpc.secure.launch import free_port
from timm_mpc.secure.spu.party import spu_addresses

from certificates import make_certificates
from cli_process import CliProcess
from party_spy import listening_sockets, secret_file

pytestmark = [pytest.mark.slow, pytest.mark.spu]  # real party processes; skipped only where SPU is not installed

MIXED = [['softmax', 'relu_softmax', 'scaling', '2quad'], ['relu_softmax', 'scaling', 'scaling', 'relu_softmax']]


def _model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('mpcvit_tiny', **{**dict(depth=2, embed_dim=32, num_heads=4, img_size=16), **kwargs}).eval()
    with torch.no_grad():  # trained-like magnitudes
        model.cls_token.normal_(0, 1)
        model.pos_embed.normal_(0, 0.5)
    return model


def _images(n=2, size=16):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) - 0.286) / 0.353


def test_semi2k_mixed_heads_and_mpcvit_plus_match_plain_text_with_spu_costs():
    model = _model(attn_pattern=MIXED, gelu_pattern=[[1, 0] * 8 + [1], 'linear'])
    images = _images(3)
    with pytest.warns(InsecureSettingWarning, match='semi2k'):
        result = secure_predict(model, images, engine='spu', protocol='semi2k', return_result=True, batch_size=2)
    with torch.no_grad():
        plain = model(images)
    assert result.settings.engine == 'spu' and result.settings.protocol == 'semi2k'
    assert torch.equal(result.logits.argmax(-1), plain.argmax(-1))
    assert (result.logits - plain).abs().max() < 2e-2
    ops = result.profile.by('op')  # SPU's own profile, per section of the plan's forward
    assert {'softmax', 'relu_softmax', 'scaling', '2quad', 'gelu', 'relu', 'layernorm', 'linear'} <= set(ops)
    assert all(ops[k]['rounds'] > 0 and ops[k]['bytes'] > 0 for k in ('softmax', 'gelu', 'layernorm', 'linear'))
    assert ops['softmax']['rounds'] > ops['scaling']['rounds']
    assert result.profile.rounds == sum(r.rounds for r in result.profile.rows) and result.profile.wall_s > 0
    # the weights are shared and the programs compiled once, outside the timed inference
    assert [(r.layer, r.op) for r in result.profile.setup] == [('weights', 'share'), ('program', 'compile')]


def test_cheetah_is_dealer_free_and_matches_plain_text():
    model = _model(depth=1, embed_dim=16, img_size=8, attn_pattern=[['relu_softmax', 'scaling', 'softmax', 'scaling']])
    images = _images(1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter('error', InsecureSettingWarning)  # the default SPU protocol is private
        result = secure_predict(model, images, engine='spu', return_result=True)
    with torch.no_grad():
        plain = model(images)
    assert result.settings.protocol == 'cheetah' and result.settings.secure and not result.settings.dealer
    assert (result.logits - plain).abs().max() < 2e-2
    assert result.profile.bytes > 0 and result.profile.dealer['requests'] == 0


def test_engine_and_protocol_are_checked_before_anything_starts():
    assert list(ENGINES) == ['crypten', 'spu'] and get_engine('spu').protocols[0] == 'cheetah'
    with pytest.raises(ValueError, match="accepted: \\['crypten', 'spu'\\]"):
        SecureSettings(engine='mpspdz')
    with pytest.raises(ValueError, match="no protocol 'aby3'; accepted: \\['cheetah', 'semi2k'\\]"):
        SecureSettings(engine='spu', protocol='aby3')
    with pytest.raises(ValueError, match='provider'):
        SecureSettings(engine='spu', provider='TFP_INSECURE')
    assert not SecureSettings(engine='spu', protocol='semi2k').secure
    with pytest.raises(ValueError, match='tcp://HOST:PORT'):
        spu_addresses('127.0.0.1:5000')
    assert spu_addresses('tcp://10.0.0.1:5000') == ['10.0.0.1:5000', '10.0.0.1:5001']
    assert spu_addresses('tcp://10.0.0.1:5000', 'client.lan:7000') == ['10.0.0.1:5000', 'client.lan:7000']


def _party_args(*args):
    """A party's command line; plaintext on loopback unless it names its TLS certificate."""
    plaintext = [] if '--tls-cert' in args else ['--insecure-plaintext']
    return ['party', '--engine', 'spu', *plaintext, '--secret-file', secret_file(), *args]


def _party(*args):  # the CLI's main in a process forked with everything imported (tests/cli_process.py)
    return CliProcess(*_party_args(*args))


def test_party_refuses_semi2k_and_a_dealer_rank(capsys):
    # refused before anything starts: in this process
    assert main(_party_args('--rank', '1', '--rendezvous', 'tcp://127.0.0.1:1', '--protocol', 'semi2k')) == 2
    assert 'refuses --engine spu --protocol semi2k' in capsys.readouterr().err
    dealer = _party('--rank', '2', '--rendezvous', 'tcp://127.0.0.1:1')
    _, err = dealer.communicate(timeout=120)
    assert dealer.returncode == 2 and 'has no dealer' in err, err[-2000:]


def test_a_client_without_its_owner_stops_within_its_timeout():
    client = _party('--rank', '1', '--rendezvous', f'tcp://127.0.0.1:{free_port()}', '--timeout', '3')
    _, err = client.communicate(timeout=120)  # a bound on the wait: a hang meets it
    assert client.returncode == 2 and 'could not meet the other party' in err, err[-2000:]


def test_two_terminal_spu_parties_over_tls_and_bench(tmp_path, capsys):
    """The owner and the client as two `timm-mpc party` processes, as on two hosts, over SPU's link with TLS: each
    party's CA is the one that signed the other's certificate alone (SPU checks no identity). A client whose
    certificate another CA signed is refused and stops within its timeout. Then `timm-mpc bench`."""
    owner_ca, client_ca = make_certificates(tmp_path / 'owner_ca'), make_certificates(tmp_path / 'client_ca')

    def tls(certs, name, peer_ca):
        return ['--tls-cert', certs[name]['cert'], '--tls-key', certs[name]['key'], '--tls-ca', peer_ca['owner']['ca']]
    images = tmp_path / 'images.pt'
    torch.save(_images(1, 8), images)
    owner_args = ['--rank', '0', '--model', 'mpcvit_tiny', '--pattern', 'scaling',
                  '--model-kwargs', '{"depth": 1, "embed_dim": 16, "img_size": 8}']

    def addresses(timeout):
        return ['--rendezvous', f'tcp://127.0.0.1:{free_port()}', '--client-address', f'127.0.0.1:{free_port()}',
                '--protocol', 'cheetah', '--timeout', timeout]
    common = addresses('60')
    owner = _party(*owner_args, *common, *tls(owner_ca, 'owner', client_ca))
    client = _party('--rank', '1', '--images', str(images), *common, *tls(client_ca, 'client', owner_ca))
    wrong = addresses('8')  # a client of the owner's own CA, not the one the owner accepts clients of
    refused_owner = _party(*owner_args, *wrong, *tls(owner_ca, 'owner', client_ca))
    refused = _party('--rank', '1', '--images', str(images), *wrong, *tls(owner_ca, 'client', owner_ca))
    client_out, client_err = client.communicate(timeout=300)
    out, err = owner.communicate(timeout=60)
    assert owner.returncode == 0 and client.returncode == 0, err[-2000:] + client_err[-2000:]
    assert 'predicted classes' in client_out and 'holds no logit' in out
    for party in (refused, refused_owner):
        _, party_err = party.communicate(timeout=120)
        assert party.returncode == 2 and 'could not meet the other party' in party_err, party_err[-2000:]

    report = tmp_path / 'bench.json'
    with pytest.warns(InsecureSettingWarning):
        assert main(['bench', 'mpcvit_tiny', '--engine', 'spu', '--protocol', 'semi2k', '--pattern', 'mu50',
                     '--model-kwargs', '{"depth": 1, "embed_dim": 32}', '--batch', '1', '--check',
                     '--json', str(report)]) == 0
    import json
    results = json.loads(report.read_text())['results']
    assert results['model']['accuracy']['top1_agreement'] == 1.0
    assert results['model']['ratio_to_baseline']['bytes'] > 1 and results['baseline']['heads'] == {'softmax': 4}
    assert {row['layer'] for row in results['model']['profile']['rows']} >= {'patch_embed', 'blocks.0', 'head'}


def _ring(share, numel):
    """A share's ring elements: the last ``8·numel`` bytes of its chunks (their content), as int64."""
    import numpy as np
    raw = b''.join(share.share_chunks)[-8 * numel:]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy())


def _decode(ring):
    from timm_mpc.secure.spu.runtime import SPU_FRACTION_BITS
    return ring.double() / 2 ** SPU_FRACTION_BITS


def _corr(x, y):
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y).abs() / (x.norm() * y.norm() + 1e-12))


def test_what_the_owner_receives_reveals_neither_image_nor_logits(monkeypatch):
    """An attacker's test: both parties run (as threads, over SPU's real link on loopback) and every share each
    receives or keeps is recorded. The owner's share of the image decodes to noise, while adding the client's kept
    share recovers the image exactly (the decoding is right; the owner's share alone says nothing), and the owner
    receives nothing after it: the logits go to the client alone. SPU's own protocol messages inside its C++
    runtime are not in this record."""
    import threading
    from timm_mpc.secure import build_secure_plan
    from timm_mpc.secure.spu import party as spu_party
    from timm_mpc.secure.secure_vit import patchify
    from timm_mpc.secure.spu.runtime import SpuSession
    received, kept = [], []
    recv_share, make = SpuSession._recv_share, SpuSession.share

    def spied_recv(self):
        share = recv_share(self)
        received.append((self.rank, share))
        return share

    def spied_share(self, value, shape, src):
        tensor = make(self, value, shape, src)
        if not self._compile_only:  # (the compile pass shares nothing)
            kept.append((self.rank, src, self.runtime.get_var(tensor.name)))
            listening.extend(listening_sockets())  # both parties' links are up (one process: both parties' sockets)
        return tensor
    listening = []
    monkeypatch.setattr(SpuSession, '_recv_share', spied_recv)
    monkeypatch.setattr(SpuSession, 'share', spied_share)
    model = _model(depth=1, embed_dim=16, img_size=8, attn_pattern='scaling')
    images = _images(1, 8)
    settings = SecureSettings(engine='spu', protocol='cheetah', timeout_s=60)
    plan = build_secure_plan(model, settings)
    rendezvous, client_address = f'tcp://127.0.0.1:{free_port()}', f'127.0.0.1:{free_port()}'
    secret = new_secret()
    owner = threading.Thread(target=spu_party.run_owner, kwargs=dict(client_address=client_address), args=(
        rendezvous, plan, plan.owner_weights(model), settings, secret))
    owner.start()
    result = spu_party.run_client(rendezvous, images, settings, secret, client_address=client_address)
    owner.join(timeout=120)
    with torch.no_grad():
        assert (result.logits - model(images)).abs().max() < 2e-2
    assert listening and all(a.startswith('127.0.0.1:') for a in listening), listening  # SPU's links: loopback only
    patches = patchify(images, plan.patch_size)
    owner_got = [share for rank, share in received if rank == 0]
    client_got = [share for rank, share in received if rank == 1]
    assert len(owner_got) == 1  # the image share, and nothing after it
    assert len(client_got) == len(plan.params) + 1  # a share of each weight, then the owner's share of the logits
    owner_share = _ring(owner_got[0], patches.numel())
    client_share = [_ring(share, patches.numel()) for rank, src, share in kept if rank == 1 and src == 1][0]
    # noise: for n independent values |r| has a standard deviation of 1/sqrt(n); six of them is never met by chance
    # (about 2e-9; 0.2 was 2.8 of them here, met about once in 200 runs)
    assert _corr(_decode(owner_share), patches) < 6 / patches.numel() ** 0.5
    assert torch.allclose(_decode(owner_share + client_share).float(), patches.flatten(), atol=1e-4)


def test_a_killed_owner_ends_the_client_with_a_clear_error_within_its_timeout():
    common = ['--rendezvous', f'tcp://127.0.0.1:{free_port()}', '--client-address', f'127.0.0.1:{free_port()}',
              '--timeout', '10']
    owner = _party('--rank', '0', '--model', 'mpcvit_tiny', '--pattern', 'softmax', *common)
    client = _party('--rank', '1', '--batch', '8', *common)
    owner.wait_for_output('connected to the other party', timeout=120)
    time.sleep(3)  # into the protocol: the client has shared its images and waits on the owner
    owner.kill()
    _, err = client.communicate(timeout=120)  # a bound on the wait: the client's own is about 2 x --timeout
    assert client.returncode == 2
    assert 'timm-mpc party: error:' in err and 'lost the other party' in err, err[-2000:]


def test_the_send_watch_counts_failed_sends_in_seconds_and_not_one_lost_request(tmp_path):
    """What ends an SPU party before yacl's exit(-1) does: SPU's logged retries, read as seconds of failing."""
    from timm_mpc.secure.spu.runtime import _SEND_RETRY, _SendWatch
    line = ("2026-11-27 06:04:25.965 [info] [channel.cc:SendRequestWithRetry:362] send request failed and retry, "
            "retry_count=3, max_retry=20, interval_ms=1000, message=[external/yacl~/yacl/link/transport/"
            "interconnection_link.cc:56] cntl ErrorCode '112', http status code '0', response header '', response "
            "body '', error msg '[E112]Not connected to 127.0.0.1:59339 yet, server_id=0'")
    found = _SEND_RETRY.search(line)
    assert found.group(1) == '3' and found.group(2) == '[E112]Not connected to 127.0.0.1:59339 yet, server_id=0'
    (tmp_path / 'spu.log').write_text('')
    lost = []
    watch = _SendWatch(str(tmp_path / 'spu.log'), 10, lost.append)
    try:
        # a peer that refuses connections: a failed attempt a second, lost after 10 s of them
        assert [watch.failed(n, 100.0 + n) for n in range(1, 12)] == [None] * 10 + [10.0]
        # requests lost now and then in a healthy run (each sent again at once) never add up
        assert all(watch.failed(1, 200.0 + 5 * k) is None for k in range(40))
        # a silent peer: each attempt waits for the timeout, so the second failure comes 11 s after the first
        assert watch.failed(1, 1000.0) is None and watch.failed(2, 1011.0) == 11.0
        # a quiet spell longer than an attempt starts the count again
        assert watch.failed(2, 2000.0) is None
        assert _SendWatch.retries(10) == 20  # the link gives up 10 s after the watch
    finally:
        watch.stop()
    assert lost == []


def test_search_cost_table_priced_on_spu_predicts_an_spu_run(tmp_path):
    """The search's per-kind table measured on SPU SEMI2K prices a whole model as a real SPU run measures it, and
    differs from CrypTen's (the search and its budgets see the engine they were asked for)."""
    from timm_mpc.cost import kind_cost_table, model_latency
    from timm_mpc.training import RunConfig

    settings = RunConfig(engine='spu', protocol='semi2k').cost_settings()
    shape = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=4, cache_dir=tmp_path)
    with pytest.warns(InsecureSettingWarning):
        table = kind_cost_table(settings=settings, **shape)
    assert table['shape']['settings']['engine'] == 'spu'
    model = _model(depth=2, attn_pattern=MIXED, gelu_pattern=['gelu', 'linear'])
    with pytest.warns(InsecureSettingWarning):
        measured = secure_predict(model, _images(1), settings, return_result=True).profile
    estimate = model_latency(model, table)
    assert estimate['rounds'] == pytest.approx(measured.rounds, rel=0.05)
    assert estimate['bytes'] == pytest.approx(measured.bytes, rel=0.05)
    crypten = kind_cost_table(**{**shape, 'cache_dir': None})  # the run's cache: tests/test_secure_parties.py's table
    assert crypten['per_head']['softmax']['rounds'] != table['per_head']['softmax']['rounds']


def test_search_refuses_an_unknown_engine_or_protocol_before_training(tmp_path, capsys):
    for flags, expected in ((['--engine', 'mpspdz'], "'mpspdz'"), (['--engine', 'spu', '--protocol', 'aby3'], 'aby3')):
        assert main(['search', '--output', str(tmp_path / 's'), '--epochs', '1', *flags]) == 2
        err = capsys.readouterr().err
        assert expected in err and 'accepted' in err
    assert not (tmp_path / 's').exists()


def test_a_party_with_another_secret_is_refused_before_spu_starts():
    """SPU's parties admit each other by the run's secret, over SPU's own link, before its runtime starts: an owner
    and a client holding different secrets are both refused, each told why."""
    import threading
    from timm_mpc.secure import build_secure_plan
    from timm_mpc.secure.spu import party as spu_party
    from timm_mpc.secure.errors import PeerError
    model = _model(depth=1, embed_dim=16, img_size=8, attn_pattern='scaling')
    settings = SecureSettings(engine='spu', protocol='cheetah', timeout_s=60)
    plan = build_secure_plan(model, settings)
    rendezvous, client_address = f'tcp://127.0.0.1:{free_port()}', f'127.0.0.1:{free_port()}'
    errors = {}

    def owner():
        try:
            spu_party.run_owner(rendezvous, plan, plan.owner_weights(model), settings, new_secret(),
                                client_address=client_address)
        except PeerError as e:
            errors['owner'] = str(e)
    thread = threading.Thread(target=owner)
    thread.start()
    with pytest.raises(PeerError, match='the owner refused this party\'s proof of the run\'s secret'):
        spu_party.run_client(rendezvous, _images(1, 8), settings, new_secret(), client_address=client_address)
    thread.join(timeout=120)
    assert 'the client did not prove that it holds this run\'s secret' in errors.get('owner', ''), errors

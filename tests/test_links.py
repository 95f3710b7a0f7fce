"""The parties' links (timm_mpc/secure/links.py): TLS 1.3 with certificates required on both sides and every peer
pinned, plaintext on loopback only, listeners on the address given only; and a stranger on the wire between real
`timm-mpc party` processes, who records every byte and searches it for the image, the weights, the logits and the
generators' seeds."""
import json
import select
import socket
import threading
import time

import pytest
import torch

from timm_mpc.cli import main
from timm_mpc.secure.errors import PeerError
from timm_mpc.secure.launch import free_port, free_ports
from timm_mpc.secure.links import LinkSecurity, connect_links

from certificates import make_certificates
from cli_process import CliProcess
from party_spy import load_view, secret_file
from small_models import MIXED, random_images, small_mpcvit


@pytest.fixture(scope='module')
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp('certs'))


def _security(certs, name, **expect):
    return LinkSecurity(certs[name]['cert'], certs[name]['key'], certs[name]['ca'], expect)


def _owner_in_thread(security, port, timeout_s=20.0):
    """An owner (rank 0 of two) meeting its client in a thread; its refusals' log lines and its links (or error)."""
    outcome = dict(log=[])

    def run():
        try:
            links = connect_links(0, 2, ('127.0.0.1', port), None, security, timeout_s, log=outcome['log'].append)
            links.send(1, b'plan')
            outcome['got'] = links.recv(1, 6)
            links.close()
        except Exception as e:  # the test reads it
            outcome['error'] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize('client', ['other-ca', 'self-signed', 'expired', 'stranger', 'plaintext'])
def test_the_owner_refuses_a_client_it_does_not_accept_and_waits_for_the_right_one(certs, client):
    """A client with a certificate of another CA, a self-signed or an expired one, one for an identity the owner does
    not accept, or no TLS at all is refused with a log line and learns it; the owner goes on waiting, and the
    accepted client then meets it and both messages cross."""
    port = free_port()
    thread, outcome = _owner_in_thread(_security(certs, 'owner', client=['client']), port)
    bad = None if client == 'plaintext' else _security(certs, client, owner=['owner'])
    with pytest.raises(PeerError, match='refused this party'):
        connect_links(1, 2, ('127.0.0.1', port), None, bad, 10.0)
    links = connect_links(1, 2, ('127.0.0.1', port), None, _security(certs, 'client', owner=['owner']), 10.0)
    assert links.recv(0, 4) == b'plan' and links.identities == {0: 'owner'}
    links.send(0, b'images')
    thread.join(30)
    links.close()
    assert outcome.get('got') == b'images', outcome
    assert len(outcome['log']) == 1 and '127.0.0.1:' in outcome['log'][0], outcome['log']
    if client == 'stranger':
        assert "a certificate for ['stranger'] as the client; accepted as the client: ['client']" in outcome['log'][0]
    else:
        assert 'SSL' in outcome['log'][0] or 'certificate' in outcome['log'][0], outcome['log']


def test_the_client_refuses_an_owner_whose_identity_it_does_not_pin(certs):
    port = free_port()
    thread, outcome = _owner_in_thread(_security(certs, 'stranger', client=['client']), port, timeout_s=5)
    with pytest.raises(PeerError, match=r"presented a certificate for \['stranger'\] as the owner"):
        connect_links(1, 2, ('127.0.0.1', port), None, _security(certs, 'client', owner=['owner']), 10.0)
    thread.join(30)
    assert isinstance(outcome.get('error'), PeerError), outcome  # the owner met no client it accepts


def test_plaintext_is_for_loopback_only_and_every_peer_must_be_pinned(certs, capsys):
    with pytest.raises(ValueError, match=r'plaintext links are for loopback only; 10\.1\.2\.3:4000 is not'):
        connect_links(1, 2, ('10.1.2.3', 4000), None, None, 1.0)
    with pytest.raises(ValueError, match='name the certificate identity this party accepts of the dealer'):
        connect_links(1, 3, ('127.0.0.1', 1), ('127.0.0.1', 2), _security(certs, 'client', owner=['owner']), 1.0)
    with pytest.raises(ValueError, match='the TLS cert must be a readable PEM file'):
        LinkSecurity('/nonexistent.crt', certs['client']['key'], certs['client']['ca'])
    with pytest.raises(ValueError, match='do not load as a PEM pair'):  # another identity's key
        LinkSecurity(certs['client']['cert'], certs['owner']['key'], certs['client']['ca'])
    # the command refuses before anything runs
    base = ['party', '--rank', '1', '--secret-file', secret_file()]
    assert main([*base, '--rendezvous', 'tcp://10.1.2.3:4000', '--insecure-plaintext']) == 2
    assert '--insecure-plaintext is for loopback only; 10.1.2.3 is not' in capsys.readouterr().err
    assert main([*base, '--rendezvous', 'tcp://127.0.0.1:4000']) == 2
    assert 'need --tls-cert, --tls-key and --tls-ca' in capsys.readouterr().err
    tls = ['--tls-cert', certs['client']['cert'], '--tls-key', certs['client']['key'], '--tls-ca', certs['client']['ca']]
    assert main([*base, '--rendezvous', 'tcp://127.0.0.1:4000', *tls, '--expect-owner', 'owner']) == 2
    assert '--expect-dealer' in capsys.readouterr().err


def test_a_peer_not_yet_admitted_cannot_make_a_party_hold_more_than_a_few_kilobytes():
    """The dealer waits on the owner while the client, connected but not admitted by the run's secret, floods it: the
    dealer keeps at most UNADMITTED_BYTES of the flood and the client's link ends with a clear error."""
    from timm_mpc.secure.links import UNADMITTED_BYTES
    owner_port, dealer_port = free_ports(2)
    owner_at, dealer_at = ('127.0.0.1', owner_port), ('127.0.0.1', dealer_port)
    outcome = {}

    def dealer():
        links = connect_links(2, 3, owner_at, dealer_at, None, 20.0, admission=True)
        outcome['from_owner'] = links.recv(0, 4)  # meanwhile the client's flood arrives
        outcome['held'] = len(links.inbox[1])
        try:
            links.recv(1, 16)
        except PeerError as e:
            outcome['error'] = str(e)
        links.close(linger_s=0.1)

    def owner():
        links = connect_links(0, 3, owner_at, dealer_at, None, 20.0, admission=True)
        time.sleep(2)  # the client floods the dealer first
        links.send(2, b'done')
        outcome['owner_links'] = links
    threads = [threading.Thread(target=f, daemon=True) for f in (dealer, owner)]
    for thread in threads:
        thread.start()
    client = connect_links(1, 3, owner_at, dealer_at, None, 20.0, admission=True)
    try:
        client.send(2, bytes(4 * 2 ** 20))
    except PeerError:  # the dealer stops reading and closes
        pass
    for thread in threads:
        thread.join(30)
    client.close(linger_s=0.1)
    outcome.pop('owner_links').close(linger_s=0.1)
    assert outcome['from_owner'] == b'done' and outcome['held'] == 0, outcome
    assert f'the client sent more than {UNADMITTED_BYTES} bytes before it was admitted' in outcome['error'], outcome


def test_a_listener_takes_connections_on_the_address_given_only():
    """The owner listens on the rendezvous address only: a process that dials the same port at another address of
    this host (127.0.0.2 reaches it too) meets no one."""
    port = free_port()
    thread, outcome = _owner_in_thread(None, port, timeout_s=3)
    time.sleep(0.5)
    for host, reached in (('127.0.0.2', False), ('127.0.0.1', True)):
        with socket.socket() as s:
            s.settimeout(5)
            assert (s.connect_ex((host, port)) == 0) == reached
    thread.join(30)
    assert isinstance(outcome.get('error'), PeerError), outcome


class Relay:
    """A stranger on the network between the parties: every connection made to its port is forwarded to
    ``target_port`` on loopback, and every byte, both ways, is kept in :attr:`record`."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.record, self.lock = target_port, bytearray(), threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._forward, args=(near,), daemon=True).start()

    def _forward(self, near: socket.socket) -> None:
        deadline = time.monotonic() + 60  # the target may not listen yet
        while True:
            try:
                far = socket.create_connection(('127.0.0.1', self.target_port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    near.close()
                    return
                time.sleep(0.1)
        peers = {near: far, far: near}
        for sock in peers:  # forward each message as it comes, as the parties' own sockets send it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 120)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    with self.lock:
                        self.record += data
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            near.close()
            far.close()

    def close(self) -> None:
        self.listener.close()


def _byte_runs(values: torch.Tensor, count: int = 4):
    """``count`` runs of four consecutive values of ``values``, spread over it, as bytes in each encoding a message
    could carry them in: float32, float64, and CrypTen's fixed point (int64, 16 fractional bits). (Each run is one
    search of the whole record: a few per tensor keep the test in seconds.)"""
    flat = values.detach().flatten().double()
    step = max(1, (flat.numel() - 3) // count)
    encodings = [flat.float().numpy(), flat.numpy(), torch.round(flat * 2 ** 16).long().numpy()]
    return [array[i:i + 4].tobytes() for array in encodings for i in range(0, flat.numel() - 3, step)]


def _found(record: bytes, values: torch.Tensor) -> int:
    return sum(run in record for run in _byte_runs(values))


@pytest.mark.parametrize('transport', ['tls', 'plaintext'])
def test_a_stranger_on_the_wire_reads_nothing_over_tls_and_the_seeds_in_plaintext(tmp_path, certs, transport):
    """Real `timm-mpc party` processes (owner, client, dealer) whose every link passes through a relay that records
    each byte: over TLS the record holds none of the image, the weights, the logits, the settings' JSON or any
    generator seed; in plaintext (the positive control) it holds every seed the client's links carried (from which,
    with the public messages, a stranger rebuilds every share) and the settings."""
    import safetensors.torch
    model = small_mpcvit(attn_pattern=MIXED, img_size=32)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / 'small.safetensors'))
    images = random_images(2, 32)
    torch.save(images, tmp_path / 'images.pt')
    owner_port, dealer_port = free_ports(2)
    to_owner, to_dealer = Relay(owner_port), Relay(dealer_port)

    def link_args(role):
        if transport == 'plaintext':
            return ['--insecure-plaintext']
        pins = {'owner': ('client', 'dealer'), 'client': ('owner', 'dealer'), 'dealer': ('owner', 'client')}[role]
        return ['--tls-cert', certs[role]['cert'], '--tls-key', certs[role]['key'], '--tls-ca', certs[role]['ca'],
                *[a for peer in pins for a in (f'--expect-{peer}', peer)]]
    common = ['party', '--secret-file', secret_file(), '--timeout', '60']
    try:
        owner = CliProcess(*common, '--rank', '0', '--model', 'mpcvit_tiny', '--checkpoint',
                           str(tmp_path / 'small.safetensors'), '--model-kwargs',
                           json.dumps(dict(depth=2, embed_dim=64, num_heads=4, img_size=32)),
                           '--rendezvous', f'tcp://127.0.0.1:{owner_port}', '--dealer', f'127.0.0.1:{to_dealer.port}',
                           *link_args('owner'))
        dealer = CliProcess(*common, '--rank', '2', '--rendezvous', f'tcp://127.0.0.1:{owner_port}',
                            '--dealer', f'127.0.0.1:{dealer_port}', *link_args('dealer'))
        client = CliProcess(*common, '--rank', '1', '--rendezvous', f'tcp://127.0.0.1:{to_owner.port}',
                            '--dealer', f'127.0.0.1:{to_dealer.port}', '--images', str(tmp_path / 'images.pt'),
                            '--json', str(tmp_path / 'client.json'), *link_args('client'),
                            view_path=str(tmp_path / 'client_view.pt'))
        outputs = [p.communicate(timeout=300) for p in (client, owner, dealer)]
    finally:
        to_owner.close()
        to_dealer.close()
    assert [p.returncode for p in (client, owner, dealer)] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    record = bytes(to_owner.record + to_dealer.record)
    logits = torch.tensor(json.loads((tmp_path / 'client.json').read_text())['logits'])
    with torch.no_grad():
        assert torch.equal(logits.argmax(-1), model(images).argmax(-1))
    seeds = load_view(tmp_path / 'client_view.pt').seeds
    assert len(record) > 10 ** 6 and len(seeds) >= 4, (len(record), seeds)  # the session passed through the relay
    print(f'{transport}: {len(record) / 1e6:.1f} MB recorded')
    seeds_found = sum(seed.to_bytes(8, 'little', signed=True) in record for seed in seeds)
    secrets = dict(image=_found(record, images), logits=_found(record, logits),
                   weights=sum(_found(record, w) for w in model.state_dict().values() if w.numel() >= 64))
    assert secrets == dict(image=0, logits=0, weights=0), secrets
    if transport == 'tls':
        assert seeds_found == 0 and b'precision_bits' not in record, seeds_found
    else:
        assert seeds_found == len(seeds) and b'precision_bits' in record, (seeds_found, len(seeds))

"""The services (timm_mpc/secure/serving/): `timm-mpc serve` and `timm-mpc dealer`
as real processes over real TLS, many `timm-mpc query` clients at once, and clients that die, stall, send garbage or
bring a certificate the service does not accept. The load test asserts no time: its figures come from
benchmarks/secure_service.py."""
import json
import re
import signal
import socket
import threading
import time

import pytest
import torch

from certificates import make_certificates
from cli_process import CliProcess
from timm_mpc.data import example_images
from timm_mpc.secure import LinkSecurity, SecureInferenceError, SecureSettings
from timm_mpc.secure.serving.control import CONTROL_LIMIT, accept_control, recv_message, send_message
from timm_mpc.secure.errors import PeerError
from timm_mpc.secure.links import connect_to, listener_at
from timm_mpc.secure.memory import PeakMemory
from timm_mpc.secure.processes import free_ports
from timm_mpc.secure.serving import ServiceLimits, connect, request_session

CLIENTS = [f'client{i}' for i in range(8)]
MAX_MEMORY = 4.5 * 2 ** 30  # the service and its sessions: two sessions of four images fit, not three


@pytest.fixture(scope='module')
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp('certs'), names=('owner', 'dealer', 'stranger', 'late', *CLIENTS))


def _tls(certs, name, **pins):
    args = ['--tls-cert', certs[name]['cert'], '--tls-key', certs[name]['key'], '--tls-ca', certs[name]['ca']]
    return args + [a for role, names in pins.items() for n in names for a in (f'--expect-{role}', n)]


def _security(certs, name, **pins):
    return LinkSecurity(certs[name]['cert'], certs[name]['key'], certs[name]['ca'], pins)


def _images():
    """32 distinct images in the model's input range: the 8 shipped examples, flipped and shifted."""
    x, _ = example_images()
    return torch.cat([x, x.flip(-1), x.flip(-2), x.roll(8, -1)])


def test_eight_clients_at_once_with_one_killed_one_stalled_and_strangers_refused(tmp_path, certs):
    """`timm-mpc serve` (the default checkpoint) and `timm-mpc dealer`, eight `timm-mpc query` clients of four images
    each at once: the service runs the sessions its memory bound allows and queues the rest; every client still
    there gets the plain-text top-1 of its own images; one client killed mid-session and one stalled end their own
    sessions only; a certificate the service does not pin, or from another CA, is refused before any session; a
    client past its image limit is refused; the service's memory stays within its bound; SIGTERM lets the running
    sessions finish and refuses new clients."""
    import timm
    model = timm.create_model('mpcvit_tiny', pretrained=True).eval()
    images = _images()
    with torch.no_grad():
        plain = model(images)
    for i in range(len(CLIENTS)):
        torch.save(images[4 * i:4 * i + 4].clone(), tmp_path / f'images{i}.pt')
    owner_port, dealer_port = free_ports(2)
    owner_sessions, dealer_sessions = free_ports(6), free_ports(6)  # the ports the sessions' processes listen on
    server, dealer_at = f'127.0.0.1:{owner_port}', f'127.0.0.1:{dealer_port}'
    dealer = CliProcess('dealer', '--listen', dealer_at, '--timeout', '30',
                        '--session-ports', f'{dealer_sessions[0]}-{dealer_sessions[-1]}',
                        *_tls(certs, 'dealer', owner=['owner'], client=[*CLIENTS, 'late']))
    service = CliProcess('serve', 'mpcvit_tiny', '--pretrained', '--listen', server, '--dealer', dealer_at,
                         '--session-ports', f'{owner_sessions[0]}-{owner_sessions[-1]}',
                         '--timeout', '30', '--max-sessions', '3', '--max-memory', str(int(MAX_MEMORY)),
                         '--max-images-per-client', '4',
                         *_tls(certs, 'owner', client=[*CLIENTS, 'late'], dealer=['dealer']))
    processes = [service, dealer]
    try:
        service.wait_for_output('owner: listening at', timeout=120)
        with PeakMemory(root=service.pid) as memory:  # the service and every process it starts

            def query(name, index):
                process = CliProcess('query', '--server', server, '--images', str(tmp_path / f'images{index}.pt'),
                                     '--json', str(tmp_path / f'{name}{len(processes)}.json'), '--timeout', '30',
                                     '--threads', '1', *_tls(certs, name, owner=['owner'], dealer=['dealer']))
                processes.append(process)
                return process, tmp_path / f'{name}{len(processes) - 1}.json'
            clients = [query(name, i) for i, name in enumerate(CLIENTS)]
            twin = query(CLIENTS[0], 0)  # the same identity again: one of the two passes its limit of four images
            strangers = [query('stranger', 0)[0], query('other-ca', 0)[0]]
            killed, stalled = clients[6][0], clients[7][0]

            def mid_session(process, act):
                process.wait_for_output('running the protocol', timeout=600)
                time.sleep(2)  # the images are shared and the parties compute
                act()
            watchers = [threading.Thread(target=mid_session, args=(killed, killed.kill)),
                        threading.Thread(target=mid_session,
                                         args=(stalled, lambda: stalled.send_signal(signal.SIGSTOP)))]
            for watcher in watchers:
                watcher.start()
            service.wait_for_output('owner: session 8 (', timeout=600)  # the last session granted is running
            service.send_signal(signal.SIGTERM)
            service.wait_for_output('owner: stopping', timeout=60)
            refused_late = query('late', 1)[0]
            outputs = [c.communicate(timeout=600) for c, _ in clients[:6] + [twin]]
            _, log = service.communicate(timeout=300)  # after its last session, the stalled one's included
        peak = memory.peak
        for watcher in watchers:
            watcher.join(10)
        stalled.send_signal(signal.SIGCONT)
        stranger_outputs = [s.communicate(timeout=60) for s in strangers]
        _, late_err = refused_late.communicate(timeout=120)

        served = [(c, path, i) for i, (c, path) in enumerate(clients[:6])] + [(twin[0], twin[1], 0)]
        over_limit = [c for c, _, _ in served if c.returncode == 2 and 'granted 4 of its 4 images' in c.output()[1]]
        assert len(over_limit) == 1, [(c.returncode, c.output()[1][-500:]) for c, _, _ in served]
        for client, path, i in served:
            if client in over_limit:
                continue
            assert client.returncode == 0, client.output()[1][-2000:]
            logits = torch.tensor(json.loads(path.read_text())['logits'])
            own = plain[4 * i:4 * i + 4]
            assert torch.equal(logits.argmax(-1), own.argmax(-1)), (i, logits.argmax(-1), own.argmax(-1))
            # nothing crossed: of every client's images, its own are the ones whose plain-text logits are nearest
            distances = [(logits - plain[4 * j:4 * j + 4]).abs().max().item() for j in range(len(CLIENTS))]
            assert min(range(len(CLIENTS)), key=distances.__getitem__) == i, (i, distances)
        assert '(client client6, 4 images): failed' in log and '(client client7, 4 images): failed' in log, log[-3000:]
        assert 'lost the other party' in log and 'moved no byte for 30 s' in log, log[-3000:]
        for stranger, (out, err) in zip(strangers, stranger_outputs):
            assert stranger.returncode == 2 and 'timm-mpc query: error:' in err, err[-2000:]
        assert 'refused this party' in stranger_outputs[0][1] and 'refused a connection' in log
        assert set(re.findall(r'session \d+ \(client (\S+),', log)) == set(CLIENTS), log[-3000:]  # none for strangers
        ports = re.findall(r'owner at 127.0.0.1:(\d+), dealer at 127.0.0.1:(\d+)', log)
        assert len(ports) == len(CLIENTS), ports
        assert all(int(o) in owner_sessions and int(d) in dealer_sessions for o, d in ports), ports
        assert any('waiting for a session' in out for out, _ in outputs)  # the memory bound queued some
        assert service.returncode == 0 and 'owner: stopped' in log, log[-3000:]
        assert refused_late.returncode == 2 and 'could not reach the owner' in late_err, late_err[-2000:]
        assert peak <= MAX_MEMORY, (peak / 2 ** 30, log[-3000:])
        print(f'service peak memory {peak / 2 ** 30:.2f} GiB of {MAX_MEMORY / 2 ** 30:.2f}')
        dealer.send_signal(signal.SIGTERM)
        _, dealer_log = dealer.communicate(timeout=60)
        assert dealer.returncode == 0 and 'dealer: stopped' in dealer_log, dealer_log[-3000:]
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.kill()


def test_service_limits_and_settings_are_checked_before_anything_starts(certs):
    with pytest.raises(ValueError, match='max_sessions must be a whole number'):
        ServiceLimits(max_sessions=0)
    with pytest.raises(ValueError, match='queue_timeout_s must be a positive'):
        ServiceLimits(queue_timeout_s=0)
    with pytest.raises(ValueError, match='accepts of the dealer'):
        request_session('127.0.0.1:1', _security(certs, 'client0', owner='owner'), 4)
    with pytest.raises(ValueError, match='the server must be HOST:PORT'):
        request_session('nowhere', _security(certs, 'client0', owner='owner', dealer='dealer'), 4)
    with pytest.raises(ValueError, match='finite'):
        connect('127.0.0.1:1', torch.full((1, 1, 32, 32), float('nan')),
                _security(certs, 'client0', owner='owner', dealer='dealer'))


def _fake_service(certs, answer):
    """An owner's service that deviates: it accepts one client and answers its request with ``answer``."""
    listener = listener_at(('127.0.0.1', 0))
    security = _security(certs, 'owner', client='client0', dealer='dealer')

    def serve():
        sock, where = listener.accept()
        with sock:
            sock, _ = accept_control(sock, security.context(server=True), 1, security, 'test', 10)
            recv_message(sock, 'client', 10)
            if isinstance(answer, bytes):
                sock.sendall(answer)
            else:
                send_message(sock, answer)
            time.sleep(0.5)
        listener.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f'127.0.0.1:{listener.getsockname()[1]}', thread


@pytest.mark.parametrize('answer, error', [
    (dict(status='start', session=1, rendezvous='tcp://127.0.0.1:9', dealer='127.0.0.1:10', secret='ab' * 32,
          settings=SecureSettings(provider='TFP_INSECURE').to_dict()), 'not private'),
    (dict(status='start', session=1, rendezvous='tcp://127.0.0.1:9', dealer='127.0.0.1:10', secret='ab' * 32,
          settings=dict(SecureSettings().to_dict(), provider='TFP')), 'not valid'),
    (dict(status='start', session=1, rendezvous='udp://x', dealer='127.0.0.1:10', secret='ab' * 32,
          settings=SecureSettings().to_dict()), 'rendezvous must be tcp'),
    (dict(status='start', session=1, rendezvous='tcp://127.0.0.1:9', dealer='127.0.0.1:10', secret='ab',
          settings=SecureSettings().to_dict()), 'secret'),
    (dict(status='refused', reason='busy'), 'refused: busy'),
    (dict(status='sure'), 'where a session belongs'),
    ((CONTROL_LIMIT + 1).to_bytes(4, 'big'), 'at most'),
    (b'\x00\x00\x00\x03abc', 'not JSON'),
])
def test_a_client_refuses_a_deviating_service_offering_what_the_protocol_never_would(certs, answer, error):
    server, thread = _fake_service(certs, answer)
    with pytest.raises(PeerError, match=error):
        request_session(server, _security(certs, 'client0', owner='owner', dealer='dealer'), 4, timeout_s=10)
    thread.join(10)


def test_a_client_pins_the_service_and_a_silent_service_ends_its_wait(certs):
    """A service presenting another identity is refused; one that accepts and never answers ends the client's wait
    within its timeout, as a SecureInferenceError from connect()."""
    listener = listener_at(('127.0.0.1', 0))
    server = f'127.0.0.1:{listener.getsockname()[1]}'
    security = _security(certs, 'stranger', client='client0')

    def serve():
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(10)
            try:
                accept_control(sock, security.context(server=True), 1, _security(certs, 'stranger', client='client0'),
                               'test', 10)
            except (OSError, PeerError):
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with pytest.raises(PeerError, match='as the owner'):
        request_session(server, _security(certs, 'client0', owner='owner', dealer='dealer'), 4, timeout_s=10)
    thread.join(10)
    listener.close()

    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(1)
    started = time.monotonic()
    with pytest.raises(SecureInferenceError, match='did not answer|timed out'):
        connect(f'127.0.0.1:{silent.getsockname()[1]}', example_images()[0][:1],
                _security(certs, 'client0', owner='owner', dealer='dealer'), timeout_s=3)
    assert time.monotonic() - started < 120  # its 3 s timeout held: only a hang reaches this bound
    silent.close()


def test_the_dealer_service_refuses_a_session_for_a_client_it_does_not_serve_or_insecure_settings(certs):
    """`DealerService` in this process: an owner it does not pin is refused at the handshake; a session for a client
    outside its own pins, or with settings that are not private, is refused with the reason, and no dealer starts."""
    from timm_mpc.secure.serving import DealerService
    lines = []
    dealer = DealerService(f'127.0.0.1:{free_ports(1)[0]}', _security(certs, 'dealer', owner='owner', client='client0'),
                           log=lines.append).start()
    owner = _security(certs, 'owner', client='client0', dealer='dealer')

    def ask(**fields):
        sock, _ = connect_to(0, 2, dealer.address, owner, time.monotonic() + 10)
        with sock:
            send_message(sock, dict(kind='session', version=1, secret='ab' * 32, client='client0',
                                    rendezvous='tcp://127.0.0.1:9', settings=SecureSettings().to_dict()) | fields)
            return recv_message(sock, 'dealer', 10)
    try:
        assert 'not among the clients this dealer serves' in ask(client='client1')['reason']
        assert 'not private' in ask(settings=SecureSettings(provider='TFP_INSECURE').to_dict())['reason']
        assert 'not a request for a session' in ask(kind='query')['reason']
        assert "has no 'secret'" in ask(secret=None)['reason']
        with pytest.raises(PeerError, match='refused this party|failed the TLS'):
            connect_to(0, 2, dealer.address, _security(certs, 'stranger', dealer='dealer'), time.monotonic() + 10)
        assert dealer.sessions == 0
        one = free_ports(1)[0]
        ports = DealerService(f'127.0.0.1:{free_ports(1)[0]}', dealer.security, session_ports=range(one, one + 1))
        ports.session_port()  # the range's one port, handed out until released
        with pytest.raises(PeerError, match='no free port for a session in its --session-ports'):
            ports.session_port()
        with pytest.raises(ValueError, match='session_ports must be a range of ports'):
            DealerService(f'127.0.0.1:{free_ports(1)[0]}', dealer.security, session_ports=range(80, 90))
    finally:
        dealer.stop()
        dealer.wait(10)
    assert any('refused a session' in line for line in lines), lines


def test_the_owner_service_refuses_bad_requests_by_name_and_bounds_a_trickling_client(certs):
    """`OwnerService` in this process (a small model): requests beyond its limits, with a null or missing field, or
    of another kind are refused with the reason before any queue or dry run; a client that trickles its request is
    cut off within the handshake bound; the service goes on answering; without its dealer's service a request is
    refused with why, and frees its place."""
    from small_models import MIXED, small_mpcvit
    from timm_mpc.secure import build_secure_plan
    from timm_mpc.secure.serving import OwnerService
    model = small_mpcvit(attn_pattern=MIXED)
    settings = SecureSettings(timeout_s=20)
    plan = build_secure_plan(model, settings)
    lines = []
    port, dealer_port = free_ports(2)
    service = OwnerService(plan, plan.owner_weights(model), settings, f'127.0.0.1:{port}', f'127.0.0.1:{dealer_port}',
                           _security(certs, 'owner', client='client0', dealer='dealer'),
                           ServiceLimits(max_images=8, max_batch_size=4, max_sessions=1), log=lines.append).start()
    client = _security(certs, 'client0', owner='owner', dealer='dealer')

    def ask(message):  # the service's last word: a refusal, or a session
        sock, _ = connect_to(1, 0, service.address, client, time.monotonic() + 10)
        with sock:
            send_message(sock, message)
            answer = recv_message(sock, 'owner', 30)
            while answer['status'] in ('queued', 'preparing'):
                answer = recv_message(sock, 'owner', 30)
            return answer
    try:
        query = dict(kind='query', version=1, images=4, batch_size=None)
        assert 'at most 8 per session' in ask(query | dict(images=10 ** 9))['reason']
        assert 'at most 4 per batch' in ask(query | dict(images=6))['reason']
        assert "has no 'images'" in ask(query | dict(images=None))['reason']
        assert "'batch_size' is not a int" in ask(query | dict(batch_size='4'))['reason']
        assert 'not a request for a session' in ask(query | dict(kind='session'))['reason']
        sock, _ = connect_to(1, 0, service.address, client, time.monotonic() + 10)
        with sock:
            sock.sendall(b'\x00\x00\x10\x00')  # a message of 4 kB announced, then a byte now and then
            with pytest.raises((ConnectionError, OSError, PeerError)):  # cut off long before a minute of trickle
                for _ in range(60):
                    sock.sendall(b'{')
                    time.sleep(1)
                    if not recv_ready(sock):
                        continue
                    if not sock.recv(1):
                        raise ConnectionError('closed')
        assert 'at most 8 per session' in ask(query | dict(images=9))['reason']  # still answering
        for _ in range(2):  # no dealer's service at its address: refused with why, and the slot is free again
            answer = ask(query | dict(images=1))
            assert "the dealer's service at" in answer['reason'] and 'gave no session' in answer['reason'], answer
    finally:
        service.stop()
        service.wait(30)
    assert any('did not send a whole message in time' in line for line in lines), lines


def recv_ready(sock):
    import select
    return bool(select.select([sock], [], [], 0)[0]) or sock.pending()

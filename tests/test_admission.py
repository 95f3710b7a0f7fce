"""Admission to a run, in one process: the challenge-response over a real socket pair, the secret files and the
rendezvous address. The parties' own use of it is in test_security.py; their links in test_links.py."""
import os
import socket
import stat
import threading

import pytest

from timm_mpc.cli import main
from timm_mpc.secure.admission import MAC_BYTES, NONCE_BYTES, admit, new_secret, read_secret
from timm_mpc.secure.errors import PeerError
from timm_mpc.secure.links import parse_rendezvous


def _ends(sock):
    def recv(size):
        data = b''
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data
    return sock.sendall, recv


def _admit_pair(first_secret, second_secret, sent=None):
    """The owner (first) and the client over a socket pair; each side's outcome (None or the error), and every byte
    the client side saw."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    outcome = {}
    send, recv = _ends(b)

    def recorded_recv(size):
        data = recv(size)
        if sent is not None:
            sent.append(data)
        return data

    def owner():
        try:
            admit(*_ends(a), first_secret, 'owner', 'client', first=True)
            outcome['owner'] = None
        except PeerError as e:
            outcome['owner'] = e
    thread = threading.Thread(target=owner)
    thread.start()
    try:
        admit(send, recorded_recv, second_secret, 'client', 'owner', first=False)
        outcome['client'] = None
    except PeerError as e:
        outcome['client'] = e
    thread.join(10)
    a.close()
    b.close()
    return outcome


def test_parties_with_the_same_secret_admit_each_other_and_the_secret_never_crosses():
    secret = new_secret()
    seen = []
    assert _admit_pair(secret, secret, seen) == dict(owner=None, client=None)
    assert [len(m) for m in seen] == [NONCE_BYTES, 1 + MAC_BYTES]  # fixed sizes: a nonce, then a verdict and a proof
    assert all(secret not in m and secret.hex().encode() not in m for m in seen)
    again = []
    _admit_pair(secret, secret, again)
    assert again[0] != seen[0] and again[1] != seen[1]  # fresh nonces: a recorded answer is worth nothing later


def test_a_wrong_secret_is_refused_both_ways_before_anything_else():
    outcome = _admit_pair(new_secret(), new_secret())
    assert 'the client did not prove that it holds this run\'s secret' in str(outcome['owner'])
    assert 'the owner refused this party\'s proof of the run\'s secret' in str(outcome['client'])


def test_a_peer_that_answers_with_the_wrong_size_is_refused():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.sendall(b'x' * 10)
    b.shutdown(socket.SHUT_WR)  # ten bytes, then nothing more
    send, recv = _ends(a)
    with pytest.raises(PeerError, match=f'the client sent 10 bytes where the admission expects {NONCE_BYTES + MAC_BYTES}'):
        admit(send, recv, new_secret(), 'owner', 'client', first=True)
    a.close()
    b.close()


def test_a_secret_file_is_written_for_its_owner_only_and_never_overwritten(tmp_path, capsys):
    path = tmp_path / 'run.secret'
    assert main(['secret', str(path)]) == 0
    assert 'wrote a new secret' in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = read_secret(path)
    assert len(secret) == 32
    assert main(['secret', str(path)]) == 2
    assert 'is never overwritten' in capsys.readouterr().err
    assert read_secret(path) == secret and os.listdir(tmp_path) == ['run.secret']  # nothing half-written beside it


@pytest.mark.parametrize('text, match', [
    (None, 'cannot read the secret file'),
    ('not hex at all', 'does not hold a hex string'),
    ('00ff' * 4, 'has 8 bytes; at least 16 are accepted'),
])
def test_a_bad_secret_file_is_refused_naming_what_is_accepted(tmp_path, text, match):
    path = tmp_path / 'run.secret'
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_secret(path)


@pytest.mark.parametrize('rendezvous, match', [
    ('127.0.0.1:29500', 'must be tcp://HOST:PORT'),
    ('tcp://127.0.0.1', 'must be tcp://HOST:PORT'),
    ('tcp://0.0.0.0:29500', 'names every interface'),
    ('tcp://no-such-host.invalid:29500', 'cannot resolve'),
])
def test_a_rendezvous_the_owner_cannot_listen_on_alone_is_refused(rendezvous, match):
    with pytest.raises(ValueError, match=match):
        parse_rendezvous(rendezvous)


def test_the_party_command_needs_a_secret_file_and_checks_it_before_anything_runs(tmp_path, capsys):
    args = ['party', '--rank', '1', '--rendezvous', 'tcp://127.0.0.1:1']
    with pytest.raises(SystemExit):
        main(args)
    assert 'the following arguments are required: --secret-file' in capsys.readouterr().err
    assert main([*args, '--secret-file', str(tmp_path / 'missing')]) == 2
    assert 'cannot read the secret file' in capsys.readouterr().err

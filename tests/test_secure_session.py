"""A secure session: the parties of one model stay up across calls (real processes, a real dealer)."""
import time

import pytest
import torch

from timm_mpc.secure import SecureInferenceError, SecureSession, SecureSettings, secure_predict

from small_models import MIXED, random_images, small_mpcvit

pytestmark = pytest.mark.slow  # real party processes


@pytest.fixture(scope='module')
def model():
    return small_mpcvit(attn_pattern=MIXED)


def test_calls_of_a_session_reuse_its_processes_and_match_plain_text(model):
    images = random_images(5)
    with torch.no_grad():
        plain = model(images)
    # the idle wait below outlasts the timeout, so the owner must keep the dealer's connection alive (10 s: a
    # message of this model takes milliseconds, even on a loaded machine)
    with SecureSession(model, SecureSettings(timeout_s=10)) as session:
        first = session.predict(images[:2], return_result=True)
        pids = {role: p.pid for role, p in session._parties.procs.items()}
        time.sleep(12)  # idle for longer than the timeout
        second = session.predict(images[2:], batch_size=2, return_result=True)  # batches of 2 and 1: new sizes
        third = session.predict(images[:2], return_result=True)
        assert {role: p.pid for role, p in session._parties.procs.items()} == pids and session.calls == 3
        assert all(p.is_alive() for p in session._parties.procs.values())
        procs = list(session._parties.procs.values())
    assert all(p.exitcode == 0 for p in procs)  # closed: every party ended the protocol cleanly
    logits = torch.cat([first.logits, second.logits])
    assert torch.equal(logits.argmax(-1), plain.argmax(-1)) and (logits - plain).abs().max() < 2e-2
    assert (third.logits - plain[:2]).abs().max() < 2e-2
    # each call's profile is its first batch's: the same protocol as one secure_predict call
    assert third.profile.rounds == first.profile.rounds == secure_predict(model, images[:2], return_result=True).profile.rounds
    assert first.profile.dealer['requests'] > 0  # the dealer's tally is the session's first call's
    with pytest.raises(RuntimeError, match='this secure session is closed; make a new SecureSession'):
        session.predict(images[:1])
    session.close()  # closing twice is harmless


def test_a_session_whose_owner_died_fails_its_next_call_clearly_and_ends(model):
    images = random_images(2)
    session = SecureSession(model, SecureSettings(timeout_s=10))
    session.predict(images[:1])
    session._parties.procs['owner'].kill()
    # the client names the owner as lost: directly, or as the dealer it waits on reports it
    with pytest.raises(SecureInferenceError, match=r'party client failed: (PeerError: lost the other party \(the '
                                                   r'owner\)|DealerError: .*the dealer lost the owner)'):
        session.predict(images)  # bounded by twice the session's timeout (a hang would meet pytest's timeout)
    with pytest.raises(RuntimeError, match='this secure session is ended by a failed call'):
        session.predict(images)
    session.close()


def test_an_engine_without_sessions_is_refused(model):
    with pytest.raises(ValueError, match=r'the SPU engine runs no sessions; use secure_predict\(\.\.\., batch_size=N\)'):
        SecureSession(model, engine='spu')

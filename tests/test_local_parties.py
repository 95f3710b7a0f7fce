"""How the process that starts a local run's parties hears from them (their reports, real processes, no protocol)."""
import multiprocessing
import time

import pytest

from timm_mpc.secure import SecureInferenceError, SecureSettings
from timm_mpc.secure.launch import LocalParties, PartyReports


def _reporting_party(role, pipe, go):
    if go is not None:
        go.wait(30)
    PartyReports(role, pipe).put('ok', role)
    # busy while the report may still be leaving: a kill now is what a shared queue could not survive (its write
    # lock stays held by the dead process, and every other party's report waits on it)
    end = time.monotonic() + 0.05
    while time.monotonic() < end:
        pass
    time.sleep(30)


def _start(ctx, go=None, timeout_s=5.0):
    pipes = {role: ctx.Pipe(duplex=False) for role in ('owner', 'client')}
    procs = {role: ctx.Process(target=_reporting_party, args=(role, pipes[role][1], go if role == 'client' else None),
                               daemon=True) for role in pipes}
    for role, proc in procs.items():
        proc.start()
        pipes[role][1].close()
    return LocalParties(procs, {role: reader for role, (reader, _) in pipes.items()}, {},
                        SecureSettings(timeout_s=timeout_s))


def test_a_party_killed_right_after_its_report_cannot_hold_back_the_others():
    ctx = multiprocessing.get_context('fork')
    for _ in range(10):  # a shared queue failed this about one time in two
        go = ctx.Event()
        parties = _start(ctx, go)
        try:
            assert parties.collect(['owner']) == {'owner': 'owner'}
            parties.procs['owner'].kill()
            go.set()
            assert parties.collect(['client']) == {'client': 'client'}
        finally:
            LocalParties.terminate(parties.procs)


def test_a_party_that_dies_without_a_report_is_named_with_its_exit_code():
    parties = _start(multiprocessing.get_context('fork'), go=multiprocessing.get_context('fork').Event())
    try:
        parties.procs['client'].kill()
        with pytest.raises(SecureInferenceError, match=r'party client exited with code -9 without a result'):
            parties.collect(['client'])
    finally:
        LocalParties.terminate(parties.procs)

"""``timm-mpc ARGS`` as a process of its own, forked from the server that imported torch, timm, timm-mpc and CrypTen
once (:func:`timm_mpc.secure.processes.process_context`, the server local parties start from): the CLI's own
``main``, its argument parsing, output and exit code, over real links, without a fresh interpreter's imports
(about 9 s of a core each on a 2-core machine). The environment is the server's, as it was when the run started.
Tests about the console script itself start a fresh interpreter (the three terminals of docs/secure.md, the module entry
point)."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Optional, Sequence, Tuple


def _cli_child(args: Sequence[str], out: str, err: str, view_path: Optional[str]) -> None:
    for fd, path in ((1, out), (2, err)):  # C++ logs (gloo, SPU) go to the descriptors, Python's to sys.*
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, 'w', buffering=1, closefd=False, encoding='utf-8')
    sys.stderr = open(2, 'w', buffering=1, closefd=False, encoding='utf-8')
    from timm_mpc.cli import main
    view = None
    if view_path is not None:  # the process records everything it holds (tests/party_spy.py)
        from party_spy import record_view
        view = record_view()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's refusals
        code = e.code
    if view is not None:
        from party_spy import save_view
        save_view(view, view_path)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class CliProcess:
    """A running ``timm-mpc ARGS``, read as :class:`subprocess.Popen` is (text output, ``returncode``,
    ``communicate(timeout)``, ``kill``, ``send_signal``), with every wait bounded."""

    def __init__(self, *args: str, view_path: Optional[str] = None) -> None:
        from timm_mpc.layers.attn_kinds import kind_modules
        from timm_mpc.secure.processes import process_context, start_processes
        self.args = args
        folder = Path(tempfile.mkdtemp(prefix='timm-mpc-cli-'))
        self.out_path, self.err_path = folder / 'stdout.txt', folder / 'stderr.txt'
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)  # nothing left in /tmp
        # not a daemon: an owner starts its dry runs' processes itself
        self.proc = process_context().Process(target=_cli_child, args=(
            list(args), str(self.out_path), str(self.err_path), view_path))
        start_processes([self.proc], kind_modules())
        self.pid = self.proc.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.exitcode

    def output(self) -> Tuple[str, str]:
        """What it wrote so far to stdout and stderr."""
        read = lambda p: p.read_text(errors='replace') if p.exists() else ''  # noqa: E731
        return read(self.out_path), read(self.err_path)

    def wait_for_output(self, text: str, timeout: float) -> str:
        """Wait until its stdout or stderr holds ``text``; raise if it ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out, err = self.output()
            if text in out or text in err:
                return out + err
            if self.returncode is not None:
                break
            time.sleep(0.2)
        out, err = self.output()
        if text in out or text in err:
            return out + err
        raise AssertionError(f'timm-mpc {" ".join(self.args)} did not print {text!r} (exit code {self.returncode}): '
                             f'{out[-1000:]}{err[-2000:]}')

    def communicate(self, timeout: float) -> Tuple[str, str]:
        """Wait for it to end (``subprocess.TimeoutExpired`` after ``timeout``, the process killed); its output."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            raise subprocess.TimeoutExpired(['timm-mpc', *self.args], timeout, *self.output())
        return self.output()

    def send_signal(self, signal: int) -> None:
        if self.proc.exitcode is None:
            os.kill(self.pid, signal)

    def kill(self) -> None:
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(10)

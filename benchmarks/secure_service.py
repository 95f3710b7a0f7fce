"""The owner's service under load: `timm-mpc serve` with the default checkpoint and `timm-mpc dealer` as real
processes over TLS (certificates made with the `openssl` commands of docs/deployment.md), --clients `timm-mpc query`
clients started at once with --images images each. Per session, from the service's log: its wait in turn and its run;
for the whole load: sessions per minute and images per second (first client started to last client done), the
service's peak memory (the service and every process it starts, sampled) against its --max-memory, and a timeline
of the sessions (PNG).

    python benchmarks/secure_service.py --clients 8 --images 4 --max-sessions 3 --max-memory 4.5GiB \\
        --json benchmarks/results/secure_service.json --markdown benchmarks/results/secure_service.md \\
        --png benchmarks/results/secure_service.png
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from timm_mpc.data import example_images
from timm_mpc.secure.memory import PeakMemory, parse_memory
from timm_mpc.secure.processes import free_ports

from report_io import add_report_args, earlier_report, write_report
from secure_links import link_args, make_certificates

_STARTED = re.compile(r'(\d\d:\d\d:\d\d) owner: session (\d+) \(client \S+, (\d+) images\): started after ([\d.]+) s')
_ENDED = re.compile(r'(\d\d:\d\d:\d\d) owner: session (\d+) \(client \S+, \d+ images\): (done in|failed after) '
                    r'([\d.]+) s')


def _wait_for(process: subprocess.Popen, path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f'the service did not print {text!r}: {path.read_text()[-2000:]}')
        time.sleep(0.2)


def load_run(args: argparse.Namespace, folder: Path) -> dict:
    owner_port, dealer_port = free_ports(2)
    server, dealer_at = f'127.0.0.1:{owner_port}', f'127.0.0.1:{dealer_port}'
    cli = [sys.executable, '-m', 'timm_mpc']
    env = dict(os.environ, HF_HUB_OFFLINE='1')  # the default checkpoint from the checkout
    images, _ = example_images()
    torch.save(images[:args.images].clone(), folder / 'images.pt')
    logs = {name: folder / f'{name}.log' for name in ('dealer', 'service')}
    dealer = subprocess.Popen([*cli, 'dealer', '--listen', dealer_at, *link_args('tls', 'dealer', folder)],
                              env=env, stderr=logs['dealer'].open('w'), stdout=subprocess.DEVNULL)
    service = subprocess.Popen([*cli, 'serve', 'mpcvit_tiny', '--pretrained', '--listen', server, '--dealer', dealer_at,
                                '--max-sessions', str(args.max_sessions), '--max-memory', args.max_memory,
                                *link_args('tls', 'owner', folder)],
                               env=env, stderr=logs['service'].open('w'), stdout=subprocess.DEVNULL)
    try:
        _wait_for(service, logs['service'], 'owner: listening at', 300)
        with PeakMemory(root=service.pid) as memory:
            start = time.perf_counter()
            clients = [subprocess.Popen([*cli, 'query', '--server', server, '--images', str(folder / 'images.pt'),
                                         '--threads', '1', *link_args('tls', 'client', folder)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                       for _ in range(args.clients)]
            failed = []
            for client in tqdm(clients, desc='clients'):
                _, err = client.communicate(timeout=args.timeout)
                if client.returncode:
                    failed.append(err[-1000:])
            wall = time.perf_counter() - start
    finally:
        for process in (service, dealer):
            process.terminate()
            process.wait(timeout=300)
    if failed:
        raise RuntimeError(f'{len(failed)} clients failed: {failed[0]}')
    log = logs['service'].read_text()
    started = {int(m[2]): dict(images=int(m[3]), waited_s=float(m[4]), start=m[1]) for m in _STARTED.finditer(log)}
    for m in _ENDED.finditer(log):
        started[int(m[2])].update(run_s=float(m[4]), ok=m[3] == 'done in')
    sessions = [started[n] for n in sorted(started)]
    return dict(wall_s=wall, peak_memory=memory.peak, sessions=sessions,
                sessions_per_minute=60 * len(sessions) / wall,
                images_per_second=sum(s['images'] for s in sessions) / wall)


def markdown(report: dict) -> str:
    s = report['summary']
    waits = [x['waited_s'] for x in report['run']['sessions']]
    runs = [x['run_s'] for x in report['run']['sessions']]
    return (f'| clients × images | --max-sessions | sessions per minute | images per second | wait in turn, '
            f'median (max) | session, median (min) | service peak memory (--max-memory) |\n'
            f'|---|---|---|---|---|---|---|\n'
            f'| {report["clients"]} × {report["images"]} | {report["max_sessions"]} | '
            f'{s["sessions_per_minute"]:.1f} | '
            f'{s["images_per_second"]:.2f} | {statistics.median(waits):.0f} s ({max(waits):.0f} s) | '
            f'{statistics.median(runs):.0f} s ({min(runs):.0f} s) | {report["run"]["peak_memory"] / 2 ** 30:.2f} GiB '
            f'({parse_memory(report["max_memory"]) / 2 ** 30:.2f} GiB) |\n\n'
            f'`{report["command"]}`; one run on a machine of {report["cores"]} cores; the first client started to '
            f'the last done: {report["run"]["wall_s"]:.0f} s.\n')


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sessions = report['run']['sessions']
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(sessions) + 1.5))
    for i, s in enumerate(sessions):
        ax.barh(i, s['waited_s'], color='0.8', label='waiting in turn' if i == 0 else None)
        ax.barh(i, s['run_s'], left=s['waited_s'], color='tab:blue', label='session' if i == 0 else None)
    ax.set_yticks(range(len(sessions)), [f'session {i + 1}' for i in range(len(sessions))])
    ax.invert_yaxis()
    ax.set_xlabel('seconds since the client asked')
    ax.set_title(f'{report["clients"]} clients × {report["images"]} images, at most {report["max_sessions"]} sessions '
                 f'and {report["max_memory"]}')
    ax.legend(loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--clients', type=int, default=8, help='clients started at once')
    parser.add_argument('--images', type=int, default=4, help='images per client (the shipped examples)')
    parser.add_argument('--max-sessions', type=int, default=3, help='the service\'s --max-sessions')
    parser.add_argument('--max-memory', default='4.5GiB', help='the service\'s --max-memory')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds a client may take')
    parser.add_argument('--png', default=None, help='write the sessions\' timeline here (PNG)')
    add_report_args(parser, json_default=None)
    args = parser.parse_args()
    report = earlier_report(args)
    if report is None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_certificates(folder)
            run = load_run(args, folder)
        report = dict(run=run, cores=os.cpu_count(), clients=args.clients, images=args.images,
                      max_sessions=args.max_sessions,
                      max_memory=args.max_memory, summary={k: run[k] for k in ('sessions_per_minute',
                                                                               'images_per_second')},
                      command=' '.join(['python benchmarks/secure_service.py', *sys.argv[1:]]))
    write_report(args, report, markdown(report))
    if args.png:
        plot(report, args.png)


if __name__ == '__main__':
    main()

"""What TLS costs on the parties' links: the default checkpoint's three `timm-mpc party` processes (owner, dealer,
client) on loopback, over TLS 1.3 with every peer pinned (certificates made with the `openssl` commands of
docs/deployment.md) and in plaintext (`--insecure-plaintext`), alternating, --repeats times each. Per run: the
client's online wall time (its cost profile: sharing, the protocol and the reveal), the whole run's (from the start of
the three processes to the client's exit, interpreters' start-up and the owner's plan included), and the rounds and
bytes (the same on both: TLS adds no message). Median and minimum, and the ratios TLS / plaintext.

    python benchmarks/secure_links.py --repeats 5 --json benchmarks/results/secure_links.json \\
        --markdown benchmarks/results/secure_links.md
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from timm_mpc.secure.launch import free_ports

from report_io import add_report_args, earlier_report, write_report

PARTIES = ('owner', 'client', 'dealer')
PINS = {'owner': ('client', 'dealer'), 'client': ('owner', 'dealer'), 'dealer': ('owner', 'client')}


def make_certificates(folder: Path) -> None:
    """The CA and one certificate per party, by the three commands of docs/deployment.md."""
    def run(*args: str) -> None:
        subprocess.run(['openssl', *args], cwd=folder, check=True, capture_output=True)
    run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '365',
        '-subj', '/CN=timm-mpc CA', '-keyout', 'ca.key', '-out', 'ca.crt')
    for party in PARTIES:
        run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', f'/CN={party}.example',
            '-keyout', f'{party}.key', '-out', f'{party}.csr')
        run('x509', '-req', '-in', f'{party}.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '90',
            '-out', f'{party}.crt')


def link_args(transport: str, role: str, certs: Path) -> list:
    if transport == 'plaintext':
        return ['--insecure-plaintext']
    return ['--tls-cert', str(certs / f'{role}.crt'), '--tls-key', str(certs / f'{role}.key'),
            '--tls-ca', str(certs / 'ca.crt'), *[a for peer in PINS[role] for a in (f'--expect-{peer}', f'{peer}.example')]]


def one_run(transport: str, certs: Path, folder: Path, images: int, timeout: float) -> dict:
    ports = free_ports(2)
    common = [sys.executable, '-m', 'timm_mpc', 'party', '--secret-file', str(folder / 'run.secret'),
              '--rendezvous', f'tcp://127.0.0.1:{ports[0]}', '--dealer', f'127.0.0.1:{ports[1]}', '--timeout', '120']
    env = dict(os.environ, HF_HUB_OFFLINE='1')  # the default checkpoint from the checkout
    out = folder / f'{transport}.json'
    start = time.perf_counter()
    owner = subprocess.Popen([*common, '--rank', '0', '--model', 'mpcvit_tiny', '--pretrained',
                              *link_args(transport, 'owner', certs)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    dealer = subprocess.Popen([*common, '--rank', '2', *link_args(transport, 'dealer', certs)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = subprocess.run([*common, '--rank', '1', '--batch', str(images), '--json', str(out),
                             *link_args(transport, 'client', certs)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    total = time.perf_counter() - start
    for proc in (owner, dealer):
        proc.communicate(timeout=120)
    if client.returncode or owner.returncode or dealer.returncode:
        raise RuntimeError(f'{transport} run failed: client {client.returncode}: {client.stderr[-1500:]} | owner '
                           f'{owner.returncode} | dealer {dealer.returncode}')
    profile = json.loads(out.read_text())['profile']
    return dict(online_s=profile['wall_s'], total_s=total, rounds=profile['rounds'], bytes=profile['bytes'])


def summary(runs: list) -> dict:
    return {key: dict(median=statistics.median(r[key] for r in runs), min=min(r[key] for r in runs))
            for key in ('online_s', 'total_s')} | dict(rounds=runs[0]['rounds'], bytes=runs[0]['bytes'])


def markdown(report: dict) -> str:
    rows = ['| links | online wall, median (min) | whole run, median (min) | rounds | MB between the parties |',
            '|---|---|---|---|---|']
    for transport in ('plaintext', 'tls'):
        s = report['summary'][transport]
        rows.append(f'| {transport} | {s["online_s"]["median"]:.2f} s ({s["online_s"]["min"]:.2f}) | '
                    f'{s["total_s"]["median"]:.1f} s ({s["total_s"]["min"]:.1f}) | {s["rounds"]} | '
                    f'{s["bytes"] / 1e6:.1f} |')
    ratio = report['ratio_tls_to_plaintext']
    return ('\n'.join(rows) + f'\n\nTLS / plaintext: online wall {ratio["online_s"]:.2f}x, whole run '
            f'{ratio["total_s"]:.2f}x (medians; {report["repeats"]} runs each, alternating, {report["images"]} '
            f'image(s), `{report["command"]}`).\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=3, help='runs per transport, alternating')
    parser.add_argument('--images', type=int, default=1, help='images per run (the shipped examples)')
    parser.add_argument('--timeout', type=float, default=900, help='seconds one run may take')
    add_report_args(parser, json_default=None)
    args = parser.parse_args()
    report = earlier_report(args)
    if report is None:
        runs = {'plaintext': [], 'tls': []}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_certificates(folder)
            subprocess.run([sys.executable, '-m', 'timm_mpc', 'secret', str(folder / 'run.secret')], check=True,
                           capture_output=True)
            for _ in tqdm(range(args.repeats), desc='runs (plaintext, tls)'):
                for transport in runs:
                    runs[transport].append(one_run(transport, folder, folder, args.images, args.timeout))
        summaries = {t: summary(r) for t, r in runs.items()}
        report = dict(runs=runs, summary=summaries, repeats=args.repeats, images=args.images,
                      command=' '.join(['python benchmarks/secure_links.py', *sys.argv[1:]]),
                      ratio_tls_to_plaintext={k: summaries['tls'][k]['median'] / summaries['plaintext'][k]['median']
                                              for k in ('online_s', 'total_s')})
    write_report(args, report, markdown(report))


if __name__ == '__main__':
    main()

"""The options every benchmark shares: where its figures go (JSON, Markdown) and rendering an earlier run."""
import argparse
import json
from pathlib import Path
from typing import Any, Optional

__all__ = ['add_report_args', 'earlier_report', 'write_report']


def add_report_args(parser: argparse.ArgumentParser, json_default: Optional[str]) -> None:
    """``--json`` (the figures), ``--markdown`` (the README table) and ``--from-json`` (render, measure nothing)."""
    parser.add_argument('--json', default=json_default, help='write the figures here')
    parser.add_argument('--markdown', default=None, help='write the README table here')
    parser.add_argument('--from-json', default=None, help='render an earlier run of --json; measure nothing')


def earlier_report(args: argparse.Namespace) -> Optional[Any]:
    """The figures of ``--from-json``, or None when this run measures."""
    return json.loads(Path(args.from_json).read_text()) if args.from_json else None


def write_report(args: argparse.Namespace, report: Any, table: str) -> None:
    """Print ``table``; write the figures to ``--json`` when this run measured them, and the table to ``--markdown``."""
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(report, indent=1) + '\n')
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table.rstrip('\n') + '\n')

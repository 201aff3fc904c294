"""``fednnunet check DATASET``: a hospital vets its data before joining a federation (the checks a site runs
before it reports anything, :func:`fednnunet.fingerprint.integrity.check_site_cases`), and the same check in
``fednnunet client`` before it connects."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import time
import textwrap

STATUS_TEXT = {"ok": "ok", "warning": "warning", "error": "ERROR"}


def run_site_check(dataset: str, site: str, num_processes: int = 1):
    """Check every case of ``dataset`` under ``$nnUNet_raw`` as a site does before it reports; raises SystemExit
    with the reason when the dataset cannot be found."""
    if not os.environ.get("nnUNet_raw"):
        raise SystemExit("error: set nnUNet_raw, the folder that holds the dataset (see the README, 'Environment')")
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints notices about its other folders at import
        from fednnunet.fingerprint.integrity import check_site_cases
        from fednnunet.fingerprint.site_dataset import resolve_dataset
    try:
        return check_site_cases(site, resolve_dataset(site, dataset), num_processes)
    except ValueError as err:  # no such dataset, or nnU-Net cannot list its cases
        raise SystemExit(f"error: {err}") from None


def format_check(check, seconds: float) -> str:
    """The per-case table (case, files, status, problems/warnings), then the dataset's problems and a summary."""
    width = max([len("case"), *(len(c.case) for c in check.cases)])
    lines = [f"{check.dataset_name} ({check.folder}): {len(check.cases)} case(s), read with "
             f"{check.reader or 'no nnU-Net reader'}", f"{'case':<{width}}  files  {'status':<7}  problems / warnings"]
    indent = " " * (width + 18)
    for c in check.cases:
        messages = [*c.problems, *c.warnings] or [""]
        head = f"{c.case:<{width}}  {len(c.files):>5}  {STATUS_TEXT[c.status]:<7}  "
        for i, message in enumerate(messages):
            wrapped = textwrap.wrap(message, 110, subsequent_indent="  ") or [""]
            lines += [((head if i == 0 and j == 0 else indent) + text).rstrip() for j, text in enumerate(wrapped)]
    lines += [f"error: {p}" for p in check.dataset_problems]
    counts = {s: sum(c.status == s for c in check.cases) for s in STATUS_TEXT}
    lines.append(f"{len(check.cases)} case(s): {counts['ok']} ok, {counts['warning']} with warnings, "
                 f"{counts['error']} with errors; {len(check.dataset_problems)} dataset problem(s) "
                 f"({seconds:.1f} s)")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    check = run_site_check(args.dataset, args.site_name or args.dataset, args.np)
    print(format_check(check, time.perf_counter() - started))
    return 1 if check.problems else 0


def precheck_client(dataset: str, site: str, num_processes: int) -> None:
    """``fednnunet client``: check the site's data before connecting; print warnings, stop on problems."""
    started = time.perf_counter()
    print(f"site {site}: checking dataset {dataset} before connecting", flush=True)
    # nnU-Net lists a dataset's cases with a fork pool and stops it with SIGTERM: its workers must die of that, so
    # they must not inherit the client's handler (SIGTERM -> KeyboardInterrupt), which left a pool hanging
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        check = run_site_check(dataset, site, num_processes)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for w in check.warnings:
        print(f"WARNING: {w}")
    if check.problems:
        print("\n".join(f"error: {p}" for p in check.problems), file=sys.stderr)
        raise SystemExit(f"error: site {site}: {len(check.problems)} data problem(s); not connecting "
                         f"(`fednnunet check {dataset}` shows every case)")
    print(f"site {site}: {len(check.cases)} case(s) checked in {time.perf_counter() - started:.1f} s, "
          f"{len(check.warnings)} warning(s)", flush=True)


def add_commands(sub) -> None:
    p = sub.add_parser("check", help="check a dataset's files and cases as a site does before joining (needs only "
                                     "nnUNet_raw); exit code 1 on errors")
    p.add_argument("dataset", help="nnU-Net dataset id or name under $nnUNet_raw")
    p.add_argument("-np", type=int, default=1, help="cases checked in parallel")
    p.add_argument("--site-name", help="site name in the messages (default: the dataset)")
    p.set_defaults(func=cmd_check)

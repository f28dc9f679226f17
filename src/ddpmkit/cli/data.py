"""`ddpm data verify SRC`: list the unreadable files of a data source.

Exit codes: 0 when every file is readable, 1 when some are not (each printed as ``PATH: REASON``
on stdout, then a count), 2 for a missing, unknown or empty source (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

EXIT_SOME_UNREADABLE = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="check data sources (image folders, CIFAR-10, .npz, digits)",
        description="Work with data sources.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    v = sub.add_parser(
        "verify",
        help="list unreadable files of a data source",
        description="Decode every file of SRC and list those that cannot be read, with the reason. "
        "Exit 0 when all are readable, 1 when some are not, 2 when SRC is missing or empty.",
    )
    v.add_argument("src", metavar="SRC",
                   help="an image folder, a CIFAR-10 archive or folder, an .npz file, 'cifar10' or 'digits'")
    v.add_argument("--download", action="store_true",
                   help="for 'cifar10': download the archive when no local copy exists")
    v.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding threads (default: min(8, CPUs))")
    v.set_defaults(func=run_verify)


def shown(text: object) -> str:
    """``text`` printable on this stdout: undecodable bytes of file names (surrogate escapes) and
    characters the stdout encoding lacks become backslash escapes, e.g. ``bad\\xff.png``."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    raw = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return raw.encode(enc, "backslashreplace").decode(enc)


def run_verify(args: argparse.Namespace) -> int:
    from ddpmkit.data import inspect_source

    report = inspect_source(args.src, download=args.download, workers=args.workers,
                            progress=sys.stderr.isatty())
    for path, reason in report.bad:
        print(shown(f"{path}: {reason}"))
    n = report.num_ignored
    ignored = f" ({n} other file{'s' if n != 1 else ''} ignored by extension)" if n else ""
    unit = "image files" if report.kind.value == "folder" else "images"
    if report.bad:
        print(shown(f"{len(report.bad)} unreadable in {report.description}: {report.num_checked} {unit} "
                    f"checked{ignored}"))
        return EXIT_SOME_UNREADABLE
    print(shown(f"all readable: {report.num_checked} {unit} in {report.description}{ignored}"))
    return 0

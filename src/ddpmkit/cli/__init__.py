"""`ddpm ...`: parses arguments, maps user errors to one line and an exit code, calls the library.

Each command group lives in its own module with a `register(subparsers)` function that adds its
parser(s) and sets `func=handler`; the handler takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

# Command modules, in the order `ddpm --help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("train", "sample", "figure", "convert", "data", "eval", "report",
                                    "reproduce")

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser without prefix abbreviations, whose errors are one line (no usage block) and
    name a mistyped option (``--outputdir``) rather than the required one it left out (``--output-dir``).
    Its subparsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._tokens: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        self._tokens = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # noqa: ANN201 - argparse's signature; never returns
        unknown = [t.partition("=")[0] for t in self._tokens
                   if t.startswith("--") and t.partition("=")[0] not in self._option_string_actions]
        if unknown and "required" in message:  # the typo is the mistake, not the missing option
            close = difflib.get_close_matches(unknown[0], list(self._option_string_actions), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"unrecognized argument {unknown[0]}{hint}"
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from ddpmkit import __version__

    parser = Parser(
        prog="ddpm",
        description="Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020): "
        "train, sample, evaluate, convert weights, draw the paper's figures.",
    )
    parser.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--log-format", choices=["terminal", "plain"], default="terminal",
                     help="terminal: progress bars and bare lines (default); plain: no bars, each line "
                     "with its time, level and source (for log files)")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"ddpmkit.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # loads torch (ddpmkit itself imports lazily): Ctrl-C lands here
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else EXIT_USER_ERROR
    from ddpmkit.logs import set_output_mode

    set_output_mode("quiet" if args.quiet else args.log_format)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        print(f"ddpm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # `ddpm ... | head`: the reader left; silence the interpreter's flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``threetowers`` command. Every mistake a user can make ends in one message, exit 2.

Such a mistake raises ``threetowers.errors.UserError`` (an invalid config or command line, bad
data beyond ``data.max_bad_fraction``, a file that is not what it claims to be, a run stopped
by non-finite steps, a command whose optional extra is not installed) or is an ``OSError`` (a
missing or unreadable file, a full disk). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from threetowers.cli.arguments import parser
from threetowers.cli.commands import HANDLERS
from threetowers.config import ConfigError, refuse_repeated_keys
from threetowers.distributed import launched_rank
from threetowers.errors import UserError, require

# The optional dependencies a command needs, checked before it starts any work.
NEEDS = {
    "index": ("faiss",),
    "serve": ("faiss", "fastapi", "uvicorn", "python_multipart"),
    "analyze": ("matplotlib",),
    "reproduce": ("matplotlib",),
}


class _Stderr(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when they are written (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _log_to_stderr() -> None:
    """Warnings (bad samples, skipped steps, migrated config keys) and summaries as
    ``threetowers: ...`` lines."""
    logger = logging.getLogger("threetowers")
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("threetowers: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    warnings.formatwarning = _format_warning  # what is shown; a caller may still record them


_PACKAGE = str(Path(__file__).parents[1])
_format_other_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings say everything in their message: one line, without the source line
    that Python shows; other libraries' keep their file and line."""
    if str(filename).startswith(_PACKAGE):
        return f"threetowers: warning: {message}\n"
    return _format_other_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    root = parser()
    # argparse stops filling a positional list at the first option, so overrides after
    # e.g. --quiet come back unparsed; they are still overrides.
    args, extra = root.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        root.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        refuse_repeated_keys(getattr(args, "overrides", []))
        for module in NEEDS.get(args.command, ()):
            require(module, f"threetowers {args.command}")
        HANDLERS[args.command](args)
    # OSError: what the operating system refused (a missing file, a permission, a full disk)
    except (UserError, OSError) as error:
        # Every torchrun rank reads the same config: rank 0 alone says what is wrong with it.
        if not (isinstance(error, ConfigError) and launched_rank() != 0):
            print(f"threetowers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"threetowers {args.command}: interrupted; re-run the same command to resume "
            "(train resumes from its last checkpoint)",
            file=sys.stderr,
        )
        return 130
    return 0

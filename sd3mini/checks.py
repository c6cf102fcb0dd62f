"""Argument checks at the package's boundary (the CLI, ``SD3Pipeline.__call__``, ``sample``, the loaders).

Each helper checks one kind of value and raises an ``ArgumentError`` whose message names the argument,
the value it got and what is allowed, before any model is built or any step runs. ``ArgumentError`` is a
``ValueError``: code that catches ValueError keeps working; the CLI exits 2 on it (a usage error).
"""

import argparse
import math
from numbers import Integral, Real

import torch

# What torch.Generator.manual_seed accepts; image i of a batch uses seed + i, so the last must fit too.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class ArgumentError(ValueError):
    """An argument outside what is allowed; the message says which, what it was and what is allowed."""


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool, not a float such as 2.5 or 32.0) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}, got {value}")
    return int(value)


def check_number(name: str, value, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """A finite real number, >= ``minimum`` / > ``above`` / <= ``maximum`` where given."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ArgumentError(f"{name} must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_seed(seed, batch: int = 1, name: str = "seed") -> int:
    """An integer that ``torch.Generator().manual_seed`` takes, for every image: seed ... seed + batch - 1."""
    check_int(name, seed)
    if not SEED_MIN <= seed <= SEED_MAX - (batch - 1):
        raise ArgumentError(f"{name} must be in [-2**63, 2**64 - {batch}] (what torch.Generator takes, for "
                            f"{batch} image{'s' * (batch > 1)}), got {seed}")
    return int(seed)


def check_finite_tensor(name: str, t: torch.Tensor):
    """Refuse NaN / inf in an input (they would silently give an all-NaN result)."""
    if not torch.is_tensor(t):
        raise ArgumentError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ArgumentError(f"{name} contains {bad} NaN or inf value{'s' * (bad > 1)} (of {t.numel()}); "
                            "inputs must be finite")


def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """A prompt or a non-empty list of them, and a negative prompt or a list of the same length."""
    prompts = [prompt] if isinstance(prompt, str) else _strings("prompt", prompt)
    if not prompts:
        raise ArgumentError("prompt is an empty list; pass a string or a list of at least one")
    if isinstance(negative_prompt, str):
        return prompts, [negative_prompt] * len(prompts)
    negatives = _strings("negative_prompt", negative_prompt)
    if len(negatives) != len(prompts):
        raise ArgumentError(f"negative_prompt has {len(negatives)} items but prompt has {len(prompts)}; "
                            "pass one negative per prompt, or a single string for all")
    return prompts, negatives


def _strings(name: str, value) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ArgumentError(f"{name} must be a string or a list of strings, got {value!r:.80}")
    return list(value)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option on one line (no usage block) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

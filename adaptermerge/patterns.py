"""Module-name patterns as peft matches `rank_pattern`/`alpha_pattern` keys.

A key is a regular expression that must match a whole dotted tail of the module name: `q_proj`,
`self_attn.q_proj` and the full name all match `model.layers.0.self_attn.q_proj`; `proj` does not. A leading
`^` anchors the key to the start of the name. peft's own `get_pattern_key` lives in a module that imports
transformers, so the rule (one regular expression) is restated here and tested against peft's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["anchored", "find_pattern_key"]


def find_pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first key (in iteration order, as in peft) that matches a dotted tail of `name`, or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def anchored(name: str) -> str:
    """A key that matches exactly the module `name` and nothing else."""
    return "^" + re.escape(name)

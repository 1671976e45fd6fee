"""transformers' PEFT version gate: which installed combinations it refuses, told before it raises deep inside."""

from __future__ import annotations

from ..versions import at_least, version

__all__ = ["gate_message", "transformers_peft_minimum"]


def transformers_peft_minimum() -> str | None:
    """The peft version transformers' PEFT integration demands, when the installed peft is older; else None."""
    from transformers.integrations import peft as integration

    minimum = getattr(integration, "MIN_PEFT_VERSION", None)
    return None if minimum is None or at_least("peft", minimum) else minimum


def gate_message(minimum: str) -> str:
    """The refused combination, with the installed versions."""
    return f"transformers {version('transformers')} requires peft >= {minimum}, peft {version('peft')} is installed"

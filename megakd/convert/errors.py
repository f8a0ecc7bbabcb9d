"""What the converters refuse, and what their ``--verify`` finds."""

from megakd.configs import ConfigError


class ConversionError(ConfigError):
    """Input that cannot be converted; the message names the file, flag or config field."""


class VerificationError(Exception):
    """``--verify`` found logits further apart than the tolerance (nothing was written)."""

    exit_status = 1

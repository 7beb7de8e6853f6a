"""User-facing errors. The CLI prints these as one clear message, without a stack trace."""


class MinigemError(Exception):
    """Base class for mistakes a user can fix (bad config, bad data, missing files)."""


class ConfigError(MinigemError, ValueError):
    """A config or recipe that does not validate; the message names the key's path."""


class DataError(MinigemError, ValueError):
    """A bad data record or file; the message names the record id and file."""


class CheckpointError(MinigemError, ValueError):
    """A missing, partial or malformed checkpoint directory."""


class ImagePipelineError(CheckpointError):
    """A missing or broken text-to-image pipeline directory, or no pipeline at all."""

"""The framework's own errors: each names the thing at fault in one sentence."""


class LicError(Exception):
    """Base of every error the framework raises on purpose."""


class ConfigError(LicError):
    """A configuration value that cannot work (names the key and the value)."""


class DataError(LicError):
    """A dataset that cannot be read: a missing or empty folder, an unreadable image."""


class CheckpointError(LicError):
    """A checkpoint that does not exist, cannot be read, or belongs to another codec."""

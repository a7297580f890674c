"""Errors the CLI reports as one line (what is wrong, what to do) instead of a traceback."""


class FlLightningError(Exception):
    """Base of every error caused by the user's input rather than a bug."""


class ConfigError(FlLightningError):
    """A config key or value is wrong; the message starts with the dotted key."""


class DataError(FlLightningError):
    """A dataset is missing, incomplete or unreadable."""


class PrivacyBudgetExceeded(FlLightningError):
    """The next round would push a client's cumulative epsilon past `privacy.max_epsilon`."""


class DeploymentError(FlLightningError):
    """A SuperLink or SuperNode of a local deployment failed to start or to answer."""

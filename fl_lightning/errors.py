"""Errors the CLI reports as one line (what is wrong, what to do) instead of a traceback."""

import signal


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


class RoundCloseError(FlLightningError):
    """A round's close failed (evaluation, checkpoint, metrics, resume state: a full disk)."""


class Stopped(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped `deploy-local`; everything it started is gone.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way out
    swallows it before the deployment's processes and files are cleaned up.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; every process it started and its "
            "temporary files are removed"
        )


class NothingTrained(FlLightningError):
    """No round of the run adopted an aggregate: the model it ends with is the initial one."""


class SecureAggregationError(FlLightningError):
    """Flower's SecAgg+ protocol failed mid-round (e.g. a client's malformed message)."""


class ClientError(FlLightningError):
    """A client cannot run the user's module or data as configured (sent to the server as
    the reply's error, said once in the run's notices)."""


class ScaffoldError(FlLightningError):
    """`fl-lightning init` cannot write the project where it was asked to."""

"""Errors the CLI reports as one line (what is wrong, what to do) instead of a traceback,
and the helpers one-line messages are made with: `check`, `show` and `closest`."""

import reprlib
import signal
from collections.abc import Iterable


class FlLightningError(Exception):
    """Base of every error caused by the user's input rather than a bug."""


class ConfigError(FlLightningError):
    """A config key or value is wrong; the message starts with the dotted key."""


class DataError(FlLightningError):
    """A dataset is missing, incomplete or unreadable."""


class PrivacyBudgetExceeded(FlLightningError):
    """The next round would push a client's cumulative epsilon past `privacy.max_epsilon`."""


class EarlyStopped(FlLightningError):
    """`federation.early_stopping`: the watched round metric stopped improving."""


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


def check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(`key: message`) unless `ok`: the form of every config rule."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


class _Short(reprlib.Repr):
    """reprlib's short repr, also for an integer of any size (repr refuses 4300+ digits)."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) > 10**30:
            return f"an integer of about 2**{x.bit_length()}"
        return super().repr_int(x, level)


_SHORT = _Short()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


def show(value: object) -> str:
    """`value` as a short one-line repr, cheap whatever its size (a user's or a client's)."""
    if isinstance(value, bytes):
        value = value[: 2 * _SHORT.maxstring].decode("latin-1")  # reprlib's repr is of str
    if isinstance(value, str) and len(value) > 4 * _SHORT.maxstring:
        value = value[: 2 * _SHORT.maxstring] + value[-2 * _SHORT.maxstring :]
    return _SHORT.repr(value)


def closest(name: object, candidates: Iterable[str]) -> str | None:
    """The candidate closest to `name`, if one is close (for "did you mean ...?" hints).

    `name` may come from a hostile or broken file: it is cut to 64 characters first, as
    difflib's work grows with the square of its length.
    """
    import difflib

    close = difflib.get_close_matches(str(name)[:64], list(candidates), n=1)
    return close[0] if close else None

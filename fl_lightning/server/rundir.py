"""Layout of a run directory: what each file is called and where it lives."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fl_lightning.config.schema import Config
from fl_lightning.config.yaml_input import dump_yaml
from fl_lightning.errors import ConfigError
from fl_lightning.files import open_regular

# The lock file whose exclusive creation claims a run directory (kept: it marks the run).
LOCK = ".fl-lightning-run"
# The environment variable through which `deploy-local` hands its claim to the ServerApp.
CLAIM_TOKEN_ENV = "FL_LIGHTNING_RUN_DIR_TOKEN"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's outputs."""

    path: Path
    # Whether this run's claim made the folder (else it claimed an existing empty one).
    created: bool = field(default=False, compare=False)

    @property
    def config(self) -> Path:
        """The resolved config the run used."""
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON object per round."""
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """Table III-style markdown summary."""
        return self.path / "summary.md"

    @property
    def curves(self) -> Path:
        """Accuracy and loss per round, as a PNG."""
        return self.path / "curves.png"

    @property
    def label_histogram(self) -> Path:
        """Per-client training-label counts (JSON; a PNG beside it)."""
        return self.path / "label_histogram.json"

    @property
    def clients(self) -> Path:
        """Per-client before/after-FL accuracies."""
        return self.path / "clients.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files."""
        return self.path / "tensorboard"

    @property
    def stopped(self) -> Path:
        """Why the run ended before its last round, when it did so by design (privacy budget)."""
        return self.path / "stopped.txt"

    def last_round(self) -> int:
        """The last round recorded in metrics.jsonl (-1 if none).

        A record cut short (the process was killed, the disk filled mid-line) is skipped
        with a warning: the rounds before it are still the run's results.
        """
        if not self.metrics.exists():
            return -1
        lines = self.read_metrics().splitlines()
        for number, line in reversed(list(enumerate(lines, 1))):
            recorded = round_of(line)
            if recorded is not None:
                return recorded
            warnings.warn(
                f"{self.metrics}: line {number} is not a complete record (cut short?); skipped",
                stacklevel=2,
            )
        return -1

    def checkpoint(self, name: str) -> Path:
        """`checkpoints/<name>.ckpt` (round_<k> or last)."""
        return self.path / "checkpoints" / f"{name}.ckpt"

    def read_metrics(self) -> bytes:
        """metrics.jsonl's bytes (OSError if it is not a plain file: never a wait on a FIFO)."""
        with open_regular(self.metrics) as stream:
            return stream.read()

    def release(self, keep: tuple[str, ...] = ()) -> Path | None:
        """Undo the claim of a run that recorded no round: its files, its lock, its folder.

        A run that fails before its first round (a census nobody answered, an error while
        starting) leaves nothing in `path`, so the same `output.dir` can be used again.
        Everything in the folder is the run's own: it was new or empty when claimed. The
        entries named in `keep` (deploy-local's logs) are moved to a new temporary folder,
        which is returned. A run whose records cannot be read is left as it is.
        """
        try:
            if self.last_round() >= 0:
                return None
        except OSError:
            return None
        kept = [self.path / name for name in keep if (self.path / name).exists()]
        aside = Path(tempfile.mkdtemp(prefix="fl-lightning-unfinished-")) if kept else None
        for entry in self.path.iterdir():
            if aside is not None and entry in kept:
                shutil.move(entry, aside / entry.name)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()
        return aside


def round_of(line: str | bytes) -> int | None:
    """The round a metrics.jsonl line records; None for a line that is no complete record."""
    try:
        recorded = json.loads(line)["round"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # cut short by a kill or a full disk (ValueError: also bad UTF-8)
    # An integer as the run writes it: not a bool, a float (1e999 is inf) or a string.
    if isinstance(recorded, bool) or not isinstance(recorded, int):
        return None
    return recorded


def run_dir_path(cfg: Config) -> Path:
    """Where a run of `cfg` writes: `output.dir`, else `<root>/<experiment>/<timestamp>`."""
    if cfg.output.dir is not None:
        return Path(cfg.output.dir)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path(cfg.output.root) / (cfg.output.experiment or "run") / stamp


def claim(path: Path, key: str = "output.dir", token: str = "") -> RunDir:
    """Make `path` this run's own: a new directory, or an empty one, claimed atomically.

    Exclusive creates decide who owns it (`mkdir` of a new directory, then an `O_EXCL`
    create of its `.fl-lightning-run` lock), so of two runs racing for one directory
    exactly one wins, and a directory holding anything (a home folder, an earlier run) is
    refused, never written into. `token` is written into the lock (see `create_run_dir`).
    Errors name `key` (`output.dir` or `output.root`) in one line; nothing is left behind.
    """
    created: list[Path] = []
    try:
        _make_parents(path.parent, created)
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            _check_empty(path, key)
        descriptor = os.open(path / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "w") as lock:
            lock.write(token)
    except FileExistsError:  # the lock: another run claimed the same empty directory first
        raise ConfigError(
            f"{key}: {path} was just claimed by another run; choose another directory"
        ) from None
    except ConfigError:
        _remove_empty(created)
        raise
    except OSError as err:
        _remove_empty(created)
        raise ConfigError(
            f"{key}: cannot create the run directory {path} ({err.strerror or err}); "
            "choose a directory you can write to"
        ) from None
    return RunDir(path, created=path in created)


def _make_parents(folder: Path, created: list[Path]) -> None:
    """`mkdir -p folder`, recording what it made (to remove it again if the claim fails)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for parent in reversed(missing):
        try:
            parent.mkdir()
            created.append(parent)
        except FileExistsError:  # made by a run racing us: fine, it is only a parent
            pass


def _check_empty(path: Path, key: str) -> None:
    """Refuse an existing `path` that is not an empty directory."""
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a directory; choose a new directory")
    run = RunDir(path)
    if run.metrics.exists() or run.config.exists() or (path / LOCK).exists():
        raise ConfigError(
            f"{key}: {path} already holds a run; choose another directory or remove it"
        )
    entries = sorted(entry.name for entry in path.iterdir())
    if entries:
        raise ConfigError(
            f"{key}: {path} is not empty (it holds {len(entries)} entries, e.g. {entries[0]!r}) "
            "and a run never writes into a directory it did not create; choose a new or "
            "empty directory"
        )


def check_claimable(path: Path, key: str = "output.dir") -> None:
    """Refuse, before any work, a `path` that `claim` would refuse (it still decides races).

    An existing path must be an empty directory; otherwise a probe directory is made and
    removed where the first missing folder would go, so an unwritable place is said now,
    before the data is decoded.
    """
    if path.exists() or path.is_symlink():
        _check_empty(path, key)
        return
    created: list[Path] = []
    try:
        _make_parents(path.parent, created)
        probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise ConfigError(
            f"{key}: cannot create the run directory {path} ({err.strerror or err}); "
            "choose a directory you can write to"
        ) from None
    finally:
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Undo a failed claim: remove the directories it made, if still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def create_run_dir(cfg: Config) -> RunDir:
    """Claim the run directory (see `run_dir_path`, `claim`) and save the resolved config in it.

    Under `deploy-local`, the CLI has claimed the directory before any process started
    (it keeps the deployment's logs there too) and hands its lock's token to every
    process in `CLAIM_TOKEN_ENV`: the ServerApp that holds the token takes that claim over.
    """
    path = run_dir_path(cfg)
    key = "output.dir" if cfg.output.dir is not None else "output.root"
    token = os.environ.get(CLAIM_TOKEN_ENV, "")
    run = RunDir(path) if token and _claimed_with(path, token) else claim(path, key)
    text = dump_yaml(cfg.to_dict())
    try:
        with run.config.open("x") as stream:  # exclusive: a config is never overwritten
            stream.write(text)
    except OSError as err:
        raise ConfigError(f"{key}: cannot write {run.config} ({err.strerror or err})") from None
    return run


def _claimed_with(path: Path, token: str) -> bool:
    """Whether `path` is locked with `token` and holds no run yet."""
    try:
        return (path / LOCK).read_text() == token and not RunDir(path).config.exists()
    except OSError:
        return False

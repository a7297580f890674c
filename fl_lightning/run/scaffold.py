"""`fl-lightning init`: write a new project, a small working starting point, into a folder.

The project's files are real files in `fl_lightning/project_template` (shipped as package
data), copied as they are; only config.yaml's `${data_root}` is filled in.
"""

from __future__ import annotations

import json
import string
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from fl_lightning.errors import ScaffoldError

TEMPLATE = "project_template"
# The one template file with a placeholder to fill in.
CONFIG = "config.yaml"


def init_project(folder: Path, data_root: Path | None = None) -> list[Path]:
    """Write the project into `folder`, its config reading MNIST from `data_root`.

    `data_root` defaults to `folder/data`; it is written as an absolute path, so that the
    project runs from any working directory.
    """
    root = data_root if data_root is not None else folder / "data"
    try:
        absolute = root.expanduser().resolve()
    except RuntimeError as err:  # `~name` of a user this machine does not know
        reason = str(err).rstrip(".")
        raise ScaffoldError(f"init: --data-root {root}: {reason}; write it out") from None
    return write_project(folder, str(absolute))


def write_project(folder: Path, data_root: str) -> list[Path]:
    """Write the template into `folder` (absent or empty), `data_root` as given; the files."""
    files = _template_files(resources.files("fl_lightning") / TEMPLATE, Path())
    written = []
    try:
        _check_free(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for relative, source in files:
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            content = source.read_bytes()
            if relative == Path(CONFIG):
                # JSON's quoted string is a YAML string too: any path reads back unchanged.
                text = string.Template(content.decode()).substitute(data_root=json.dumps(data_root))
                content = text.encode()
            target.write_bytes(content)
            written.append(target)
    except OSError as err:
        raise ScaffoldError(
            f"init: cannot write into {folder} ({err.strerror or err}); pick a folder you can "
            "write to"
        ) from None
    return written


def _check_free(folder: Path) -> None:
    """Refuse a folder that holds anything: a new project never overwrites a file."""
    if folder.exists() and not folder.is_dir():
        raise ScaffoldError(
            f"init: {folder} is a file; give a folder that does not exist yet or is empty"
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise ScaffoldError(
            f"init: {folder} is not empty; give a folder that does not exist yet or is empty"
        )


def _template_files(directory: Traversable, relative: Path) -> list[tuple[Path, Traversable]]:
    """Every template file under `directory`, by its path in the new project, sorted."""
    files = []
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        # Python's bytecode caches appear beside the templates once anything imports them.
        if entry.name == "__pycache__" or entry.name.endswith(".pyc"):
            continue
        if entry.is_dir():
            files += _template_files(entry, relative / entry.name)
        else:
            files.append((relative / entry.name, entry))
    return files

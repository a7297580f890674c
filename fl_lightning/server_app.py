"""Flower ServerApp: the run's rounds (`fl_lightning.server.federation`) over Lightning clients."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_lightning.config.node_config import config_from_run_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import ConfigError
from fl_lightning.server.rundir import RunDir, create_run_dir

if TYPE_CHECKING:
    from fl_lightning.server.resume_state import ResumeState


def make_server_app(
    cfg: Config | None = None,
    run: RunDir | None = None,
    console: bool = True,
    resume: ResumeState | None = None,
) -> ServerApp:
    """A ServerApp bound to `cfg` and `run`, or reading the config from the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None and not context.run_config.get("verbose", False):
            # As `fl-lightning run` without --verbose: our one line per round, not Flower's.
            logging.getLogger("flwr").setLevel(logging.WARNING)
        config = cfg or config_from_run_config(context.run_config)
        if cfg is None and config.output.client_report:
            raise ConfigError(
                "output.client_report: runs in `fl-lightning run`'s driver after the "
                "federation, not in a ServerApp started by flwr run; set it to false"
            )
        # torch and Lightning load when the ServerApp runs, not when it is imported.
        from fl_lightning.models.trainer import setup_lightning_process
        from fl_lightning.server.federation import run_federation

        setup_lightning_process()  # this process's entry into fl-lightning
        run_federation(
            grid, config, run or create_run_dir(config), context, console=console, resume=resume
        )

    return app


# Entry point for `flwr run .` ([tool.flwr.app.components] in pyproject.toml).
app = make_server_app()

"""Flower ClientApp: each message goes to its handler in `fl_lightning.client.handlers`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fl_lightning.config.node_config import config_from_run_config, node_run_config
from fl_lightning.config.schema import Config
from fl_lightning.vocabulary import BATCHNORM_ACTION, CENSUS_ACTION

Handler = Callable[[Config, Message, Context], Message]


def _clipping_mod(cfg: Config | None) -> Mod:
    """Flower's `fixedclipping_mod` when the run's config has clients clip, else a pass-through."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = cfg or config_from_run_config(context.run_config)
        p = config.privacy
        # Under secure aggregation the legacy client clips its own delta (client.secure).
        if (
            p.mode == "client_dp"
            and p.clipping == "client"
            and not config.secure_aggregation.enabled
        ):
            from flwr.clientapp.mod import fixedclipping_mod

            return fixedclipping_mod(msg, context, call_next)
        return call_next(msg, context)

    return mod


def make_client_app(
    cfg: Config | None = None, secure_mods: Sequence[Mod] = (), mods: Sequence[Mod] = ()
) -> ClientApp:
    """A ClientApp bound to `cfg`, or reading it from the run config when `cfg` is None.

    `mods` wrap every message (tests inject client faults with them).

    Runs with `secure_aggregation.enabled` speak Flower's legacy API (SecAgg+ exists only
    there): their train and evaluate messages go to the legacy ClientApp of
    `fl_lightning.client.secure`, which calls the same Lightning training. `secure_mods`
    run before its `secaggplus_mod` (tests use them to make a client drop out mid-protocol).
    """
    app = ClientApp(mods=list(mods))
    secure_app: ClientApp | None = None

    def handle(name: str, secure: bool = False) -> Callable[[Message, Context], Message]:
        def handler(msg: Message, context: Context) -> Message:
            nonlocal secure_app
            config = node_run_config(cfg, context.run_config, context.node_config)
            if secure and config.secure_aggregation.enabled:
                if secure_app is None:
                    from fl_lightning.client.secure import make_secure_client_app
                    from fl_lightning.models.trainer import setup_lightning_process

                    setup_lightning_process()  # this process's entry into fl-lightning
                    secure_app = make_secure_client_app(cfg, secure_mods)
                return secure_app(msg, context)
            # torch and Lightning load on the first message, not when the app is imported.
            from fl_lightning.client import handlers
            from fl_lightning.models.trainer import setup_lightning_process

            setup_lightning_process()  # this process's entry into fl-lightning
            handle_message: Handler = getattr(handlers, name)
            return handle_message(config, msg, context)

        return handler

    app.train(mods=[_clipping_mod(cfg)])(handle("train", secure=True))
    app.evaluate()(handle("evaluate", secure=True))
    app.query(BATCHNORM_ACTION)(handle("batchnorm_statistics"))
    app.query(CENSUS_ACTION)(handle("census"))
    return app


# Entry point for `flwr run .` and SuperNodes ([tool.flwr.app.components] in pyproject.toml).
app = make_client_app()

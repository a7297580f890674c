"""How a run is started on this machine: the Simulation Engine, deploy-local (with its
certificates), `fl-lightning init`, and the driver's client report. Only here are both the
ClientApp and the ServerApp known."""

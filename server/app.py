"""Flower ServerApp: thin; the work is ``lordba_fl.federation.apps.run_server``."""

from flwr.serverapp import ServerApp

from lordba_fl.federation.apps import run_server


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` is used when Flower's context carries none (the Python simulation API)."""
    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_server(grid, dict(context.run_config) or run_config or {})

    return app


app = make_server_app()

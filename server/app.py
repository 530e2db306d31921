"""Flower ServerApp: thin; the work is ``lordba_fl.federation.apps.run_server``."""

from lordba_fl.federation.quiet import quiet_dependencies

quiet_dependencies(flower_info=False)  # known third-party warnings, before they are imported; one line a round

from flwr.serverapp import ServerApp  # noqa: E402

from lordba_fl.federation.apps import run_server  # noqa: E402


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` is used when Flower's context carries none (the Python simulation API)."""
    app = ServerApp()

    @app.main()
    def main(grid, context):
        quiet_dependencies(flower_info=False)  # again: a loader may have restored the filters since import
        run_server(grid, dict(context.run_config) or run_config or {})

    return app


app = make_server_app()

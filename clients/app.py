"""Flower ClientApp: thin; the work is ``lordba_fl.federation.apps.client_train`` / ``client_evaluate``."""

from lordba_fl.federation.quiet import quiet_dependencies

quiet_dependencies()  # known third-party warnings, before they are imported

from flwr.clientapp import ClientApp  # noqa: E402

from lordba_fl.federation.apps import client_evaluate, client_query, client_train  # noqa: E402


def make_client_app(run_config: dict | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` is used when Flower's context carries none (the Python simulation API)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        quiet_dependencies()  # again: a loader may have restored the filters since import
        return client_train(msg, context, run_config)

    @app.evaluate()
    def evaluate(msg, context):
        quiet_dependencies()  # again: a loader may have restored the filters since import
        return client_evaluate(msg, context, run_config)

    @app.query()
    def query(msg, context):
        quiet_dependencies()  # again: a loader may have restored the filters since import
        return client_query(msg, context, run_config)

    return app


app = make_client_app()

"""Flower ClientApp: thin; the work is ``lordba_fl.federation.apps.client_train`` / ``client_evaluate``."""

from flwr.clientapp import ClientApp

from lordba_fl.federation.apps import client_evaluate, client_query, client_train


def make_client_app(run_config: dict | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` is used when Flower's context carries none (the Python simulation API)."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        return client_train(msg, context, run_config)

    @app.evaluate()
    def evaluate(msg, context):
        return client_evaluate(msg, context, run_config)

    @app.query()
    def query(msg, context):
        return client_query(msg, context, run_config)

    return app


app = make_client_app()

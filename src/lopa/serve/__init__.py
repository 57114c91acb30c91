"""`lopa serve`: an OpenAI-compatible HTTP server over the batch engine (needs the `serve` extra).

    from lopa.serve import create_app
    app = create_app(lopa.load_model(), ServeConfig(api_key="..."))   # a FastAPI app; serve(app, host, port)
"""

from .app import create_app
from .server import BackgroundServer, serve

__all__ = ["create_app", "serve", "BackgroundServer"]

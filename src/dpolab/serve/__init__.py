"""`dpolab serve`: a Flask web app to chat with a DPO model, compare it with its reference, and
capture new preference pairs; with a JSON API and an OpenAI-compatible API.

Application factory in the Flask-tutorial style::

    app = create_app({"MODEL": "runs/demo"})   # loads the models once, in the background
    serve_forever(app, "127.0.0.1", 8000)      # waitress, see dpolab.serve.server
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

DEFAULT_CONFIG: dict[str, Any] = {
    "MODEL": None,  # run / sweep / export folder, built-in name or Hub id
    "REFERENCE": None,  # reference model; None = the run's recorded base model
    "PRECISION": "fp32",  # weights for generation: fp32, bf16 or int8 (dpolab.generate; 2x faster decode on CPU)
    "MODELS": None,  # an already loaded ServedModels (tests share one across apps)
    "WORKERS": 8,  # generations running at once; they share each decode step (dpolab.serve.batching)
    "MAX_QUEUE": 8,  # generations waiting for a worker before requests get 429
    "MAX_NEW_TOKENS": 512,  # server cap on max new tokens per answer
    "DEFAULT_MAX_NEW_TOKENS": 128,
    "MAX_CONTEXT": None,  # tokens of prompt + answer; None = the model's context length
    "REQUEST_TIMEOUT_S": 120.0,  # per-request limit, queue wait included
    "PREFERENCES_PATH": "preferences.jsonl",
    "PREFERENCE_MAX_ROW_BYTES": 64 * 1024,  # one saved pair (the prompt dialogue twice + two answers)
    "PREFERENCES_PER_MINUTE": 30,  # saved pairs a minute; a person clicking is far below this
    "PREFERENCES_MAX_BYTES": 64 * 1024 * 1024,  # the preferences file's cap (507 past it)
    "MAX_CONTENT_LENGTH": 64 * 1024,  # request bodies over 64 KB -> 413
    "LOAD_IN_BACKGROUND": True,  # so /healthz can answer 503 while the models load
    "API_KEY": None,  # set: every request but /healthz needs it (dpolab.serve.auth)
    "LOAD_AT_CREATE": True,  # False: the caller starts loading (engine.start()), e.g. once its port is bound
}

# Model output is untrusted text: no inline script or style may run, whatever it contains.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    # Imported here, not at module level: `dpolab --help` imports dpolab.serve.cli, and through it
    # this package, and must stay fast.
    from flask import Flask, g, jsonify, request
    from werkzeug.exceptions import HTTPException

    from dpolab.serve import api, openai_api, ui
    from dpolab.serve.auth import require_key
    from dpolab.serve.generation import Engine
    from dpolab.serve.metrics import Metrics
    from dpolab.serve.models import load_served_models
    from dpolab.serve.preferences import GrowthLimit
    from dpolab.serve.validation import ApiError

    app = Flask(__name__)
    app.config.from_mapping(DEFAULT_CONFIG)
    if test_config:
        app.config.from_mapping(test_config)
    config = app.config
    if config["MODELS"] is None and not config["MODEL"]:
        raise ValueError("create_app: set MODEL (a model source) or MODELS (loaded models)")

    preloaded = config["MODELS"]

    def loader() -> Any:
        return preloaded if preloaded is not None else load_served_models(config["MODEL"], config["REFERENCE"],
                                                                                   config["PRECISION"])

    engine = Engine(loader, workers=config["WORKERS"], max_queue=config["MAX_QUEUE"], metrics=Metrics())
    app.extensions["dpolab.engine"] = engine
    app.extensions["dpolab.preference_limit"] = GrowthLimit(
        config["PREFERENCE_MAX_ROW_BYTES"], config["PREFERENCES_PER_MINUTE"], config["PREFERENCES_MAX_BYTES"])
    if config["LOAD_AT_CREATE"]:
        engine.start(background=config["LOAD_IN_BACKGROUND"] and preloaded is None)

    app.register_blueprint(ui.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(openai_api.bp)

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Any:
        return jsonify(exc.body()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        # JSON for API clients (413 body too large, 404, 405...); HTML pages keep Flask's pages.
        if not request.path.startswith(("/api/", "/v1/")):
            return exc
        kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
        message = f"request body is over the {config['MAX_CONTENT_LENGTH']} byte limit" if exc.code == 413 \
            else (exc.description or exc.name)
        return jsonify(ApiError(message, exc.code or 500, type_=kind, code=exc.name.lower().replace(" ", "_"))
                       .body()), exc.code

    @app.before_request
    def start_clock() -> None:
        g.started = time.monotonic()

    if config["API_KEY"] is not None:
        app.before_request(partial(require_key, config["API_KEY"]))

    @app.after_request
    def headers_and_metrics(response: Any) -> Any:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("started")
        engine.metrics.count_request(endpoint, response.status_code,
                                     None if started is None else time.monotonic() - started)
        return response

    return app

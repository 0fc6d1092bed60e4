"""``edgepack serve BUNDLE``: run the on-device OpenAI-compatible server (parse, call, render).

Device side: imports only click here; the server (starlette, uvicorn, llama-cpp-python) is
imported when the command runs.
"""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 127.0.0.1 keeps the server local to the device.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0 picks a free one and prints it).")
@click.option("--api-key", envvar="EDGEPACK_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/*. /healthz, /readyz and "
              "/metrics stay open for probes and Prometheus.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for the engine (default: server.toml's n_threads).")
@click.option("--queue-size", type=click.IntRange(0), default=None,
              help="Requests that may wait while one runs; more get 429 with Retry-After "
              "(default: server.toml's queue_size).")
@click.option("--ctx", type=click.IntRange(16), default=None,
              help="Context window in tokens (default: server.toml's n_ctx, from the plan).")
@click.option("--require-signature", "trusted_key", default=None, metavar="PUB",
              envvar="EDGEPACK_TRUSTED_KEY", show_envvar=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="Refuse to start (exit 6) unless BUNDLE carries a signature "
              "(provenance.intoto.jsonl, `edgepack sign`) by this ed25519 public key.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="Server log verbosity.")
def serve(bundle: str, host: str, port: int, api_key: str | None, threads: int | None,
          queue_size: int | None, ctx: int | None, trusted_key: str | None,
          log_level: str) -> None:
    """Serve BUNDLE with an OpenAI-compatible API.

    The bundle is verified against its manifest first (exit 6 if any file differs). The model
    loads in the background: /healthz answers at once, /readyz turns 200 once the model has
    loaded and answered a warm-up request. SIGTERM stops accepting, finishes requests in
    flight (server.toml's drain_seconds) and exits 0. Exit 7 when the engine cannot load.

    Routes: GET /v1/models, POST /v1/chat/completions, /v1/completions (stream: true gives
    SSE), /v1/embeddings, GET /healthz, /readyz, /metrics (Prometheus).
    """
    if trusted_key:
        from edgepack.signature import verify_signature

        # The signature authenticates the manifest; the server then checks every file
        # against it before loading, so a signed bundle is fully checked, and read once.
        verify_signature(bundle, [trusted_key])
    from edgepack.runtimes.serve import ServeOptions, run_server

    run_server(bundle, ServeOptions(host=host, port=port, api_key=api_key, threads=threads,
                                    queue_size=queue_size, ctx=ctx, log_level=log_level))

"""``edgepack serve BUNDLE [BUNDLE...]``: run the on-device OpenAI-compatible server (parse,
call, render).

Device side: imports only click here; the server (starlette, uvicorn, llama-cpp-python) is
imported when the command runs. Every option also reads an ``EDGEPACK_*`` variable (shown in
``--help``), so a systemd unit's ``Environment=``/``EnvironmentFile=`` can set any of them.
"""

from __future__ import annotations

import click


def _providers(ctx: click.Context, param: click.Parameter, value: str | None
               ) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(p.strip() for p in value.split(",") if p.strip())
    if not names:
        raise click.BadParameter(f"{value!r} names no provider; e.g. --providers cuda,cpu")
    return names


@click.command("serve")
@click.argument("bundles", nargs=-1, required=True, metavar="BUNDLE [BUNDLE...]",
                type=click.Path(file_okay=False, path_type=str))
@click.option("--host", default=None, envvar="EDGEPACK_HOST", show_envvar=True,
              help="Address to listen on (default: the config's, else 127.0.0.1, which keeps "
              "the server local to the device).")
@click.option("--port", default=None, type=click.IntRange(0, 65535), envvar="EDGEPACK_PORT",
              show_envvar=True,
              help="TCP port (default: the config's, else 8080; 0 picks a free one and prints "
              "it).")
@click.option("--api-key", envvar="EDGEPACK_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/*. /healthz, /readyz and "
              "/metrics stay open for probes and Prometheus.")
@click.option("--config", "config_file", default=None, envvar="EDGEPACK_CONFIG",
              show_envvar=True, type=click.Path(dir_okay=False, path_type=str),
              help="Device-local settings layered over the bundle's server.toml ([engine] and "
              "[server] tables, [models.\"<model id>\".engine] for one model; default "
              "/etc/edgepack/server.toml when it exists).")
@click.option("--threads", type=click.IntRange(1), default=None, envvar="EDGEPACK_THREADS",
              show_envvar=True,
              help="CPU threads for the engine (default: server.toml's n_threads; capped at "
              "the machine's cores).")
@click.option("--queue-size", type=click.IntRange(0), default=None,
              envvar="EDGEPACK_QUEUE_SIZE", show_envvar=True,
              help="Requests that may wait while one runs; more get 429 with Retry-After "
              "(default: server.toml's queue_size).")
@click.option("--ctx", type=click.IntRange(16), default=None, envvar="EDGEPACK_CTX",
              show_envvar=True,
              help="Context window in tokens (default: server.toml's n_ctx, from the plan). "
              "One bundle only (several: n_ctx per model in the --config file).")
@click.option("--memory-budget-bytes", "memory_budget", default=None, type=click.IntRange(1),
              metavar="N", envvar="EDGEPACK_MEMORY_BUDGET_BYTES", show_envvar=True,
              help="Memory the models may use together (default: what the machine and the "
              "cgroup have free). The bundles' planned memory is checked against it before "
              "loading: exit 7 when it does not fit.")
@click.option("--require-signature", "trusted_key", default=None, metavar="PUB",
              envvar="EDGEPACK_TRUSTED_KEY", show_envvar=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="Refuse to start (exit 6) unless each BUNDLE carries a signature "
              "(provenance.intoto.jsonl, `edgepack sign`) by this ed25519 public key.")
@click.option("--max-connections", type=click.IntRange(8), default=None,
              envvar="EDGEPACK_MAX_CONNECTIONS", show_envvar=True,
              help="Open client connections past which idle ones are closed to make room "
              "(default 256, kept under the file-descriptor limit). Sockets that connected "
              "under 2 s ago may still be sending their request and are spared, up to 4 x this "
              "in a burst.")
@click.option("--cpu", is_flag=True, default=False, envvar="EDGEPACK_CPU", show_envvar=True,
              help="Serve on the CPU although the bundle asks for a GPU the engine lacks "
              "(otherwise that is exit 7). /readyz and the log say so.")
@click.option("--providers", default=None, callback=_providers, envvar="EDGEPACK_PROVIDERS",
              show_envvar=True,
              help="ONNX bundles: onnxruntime execution providers in priority order, e.g. "
              "'cuda,cpu' or 'cpu' (default: server.toml's).")
@click.option("--log-level", default="info", show_default=True, envvar="EDGEPACK_LOG_LEVEL",
              show_envvar=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="Server log verbosity; the access log (one line per request) is on at "
              "info and debug.")
@click.option("--log-format", default="plain", show_default=True,
              envvar="EDGEPACK_LOG_FORMAT", show_envvar=True,
              type=click.Choice(["plain", "json"]),
              help="Log lines as plain text or one JSON object per line.")
def serve(bundles: tuple[str, ...], host: str | None, port: int | None, api_key: str | None,
          config_file: str | None, threads: int | None, queue_size: int | None,
          ctx: int | None, memory_budget: int | None, trusted_key: str | None,
          max_connections: int | None, cpu: bool,
          providers: tuple[str, ...] | None, log_level: str, log_format: str) -> None:
    """Serve BUNDLE (or several) with an OpenAI-compatible API.

    Each bundle is verified against its manifest first (exit 6 if any file differs or is a
    link), and the engine loads the very bytes that were verified. Before loading, the
    bundles' planned memory is added up and checked against the memory available (exit 7
    when it does not fit; see --memory-budget-bytes). The models load in the background: /healthz
    answers at once, /readyz turns 200 once every model has loaded and answered a warm-up
    request, and reports each loaded model's sha256 and effective configuration. SIGTERM
    stops new work (/readyz 503), finishes requests in flight (server.toml's drain_seconds)
    and exits 0. Exit 7 when an engine cannot load or lacks what a bundle asks for (e.g. GPU
    offload; see --cpu).

    Several bundles (e.g. a chat model and an embedding model for on-device RAG) share one
    port: a request goes to the model its "model" field names (GET /v1/models lists them; any
    other name is a 404). Engine options (--threads, --queue-size, --cpu, --providers, the
    --config file's [engine]) apply to each bundle, its [models."<model id>".engine] tables to
    one model (flags win over them); server options (host, port, key, limits) come from the
    first bundle's server.toml and the flags.

    Routes: GET /v1/models, POST /v1/chat/completions, /v1/completions (stream: true gives
    SSE), /v1/embeddings, GET /healthz, /readyz, /metrics (Prometheus).
    """
    from edgepack.runtimes.serve import ServeOptions, run_server

    # With a key, the server checks each bundle's signature over its manifest, then every
    # file once against that manifest through the descriptors it loads from
    # (runtimes/serve.py prepare).
    run_server(bundles, ServeOptions(
        host=host, port=port, api_key=api_key, threads=threads, queue_size=queue_size, ctx=ctx,
        max_connections=max_connections, log_level=log_level, log_format=log_format,
        config=config_file, cpu=cpu, providers=providers, memory_budget=memory_budget,
        trusted_keys=(trusted_key,) if trusted_key else ()))

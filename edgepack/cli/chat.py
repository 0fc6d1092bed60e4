"""``edgepack chat BUNDLE|URL``: talk to a model in the terminal.

With a URL it talks to a running server; with a bundle folder it starts ``edgepack serve`` on
127.0.0.1 (a free port), waits until the model is ready, and stops it on exit. Answers stream
as they are generated; the conversation is kept until ``/reset``. Lines from a pipe work too
(one message per line), which is how scripts and tests drive it.

Commands: ``/reset`` (forget the conversation), ``/exit`` or Ctrl-D (quit), ``/help``.
Ctrl-C stops an answer in progress; at the prompt it quits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


@click.command("chat")
@click.argument("target")
@click.option("--api-key", envvar="EDGEPACK_API_KEY", default=None, show_envvar=True,
              help="The server's key (sent as 'Authorization: Bearer KEY'); with a bundle, the "
              "started server requires it too.")
@click.option("--system", "system_prompt", default=None, metavar="TEXT",
              help="A system message at the start of the conversation.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=None,
              help="Sampling temperature (default: the server's).")
@click.option("--seed", type=int, default=None, help="Sampling seed, for repeatable answers.")
def chat(target: str, api_key: str | None, system_prompt: str | None, max_tokens: int,
         temperature: float | None, seed: int | None) -> None:
    """Chat with a bundle (starts a local server) or a running server at a URL."""
    from edgepack.cli.output import note
    from edgepack.client import ServerClient

    params: dict = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    if seed is not None:
        params["seed"] = seed
    if target.startswith(("http://", "https://")):
        client = ServerClient(target, api_key=api_key)
        _session(client, system_prompt, params)
        return
    bundle = Path(target)
    if not bundle.is_dir():
        from edgepack.errors import UsageError

        raise UsageError(f"{target!r} is neither a bundle folder nor an http(s):// URL",
                         hint="e.g. edgepack chat bundles/NAME-DEVICE or "
                         "edgepack chat http://127.0.0.1:8080")
    from edgepack.local_server import LocalServer

    with LocalServer(bundle, api_key=api_key) as server:
        url = server.wait_listening()
        note(f"started edgepack serve {bundle} on {url}; loading the model ...")
        status = server.wait_ready()
        note(f"ready: {status.get('model')} {status.get('quant') or ''}, "
             f"context {status.get('n_ctx')} tokens")
        _session(server.client, system_prompt, params)


def _session(client, system_prompt: str | None, params: dict) -> None:
    from edgepack.cli.output import note
    from edgepack.errors import RuntimeHealthError

    model = client.model()
    interactive = sys.stdin.isatty()
    note(f"chatting with {model}; {HELP}")
    history: list[dict[str, str]] = []
    if system_prompt:
        history.append({"role": "system", "content": system_prompt})
    base = len(history)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            del history[base:]
            note("conversation reset")
            continue
        if text in ("/help", "/?"):
            note(HELP)
            continue
        if text.startswith("/"):
            note(f"unknown command {text.split()[0]!r}; {HELP}")
            continue
        history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in client.stream_chat(model, history, **params):
                pieces.append(piece)
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            note("\n(stopped)")
        except RuntimeHealthError as e:
            # One failed turn (context full, server busy) does not end the conversation.
            history.pop()
            click.echo(f"\nerror: {e.render()}", err=True)
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(pieces)})

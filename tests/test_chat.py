"""`edgepack chat`: a real server (started by the command, or already running), real
streaming, history kept between turns and dropped by /reset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgepack.cli import chat as chat_cli
from edgepack.cli.main import cli
from edgepack.client import ServerClient

pytestmark = pytest.mark.slow
# support/ota.py: the shipped Q4_1 SmolLM2 answers this one reliably with "Paris".
QUESTION = "What is the capital of France? Answer in one word."


def test_chat_starts_a_server_for_a_bundle_and_answers(chat_bundle):
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_API_KEY"}
    p = subprocess.run(
        [sys.executable, "-m", "edgepack", "chat", str(chat_bundle), "--temperature", "0",
         "--max-tokens", "24", "--api-key", "sekret"],
        input=f"{QUESTION}\n/reset\n/nope\n{QUESTION}\n/exit\n", capture_output=True,
        text=True, timeout=300, env=env,
    )
    assert p.returncode == 0, p.stderr
    # Greedy decoding: the same answer, with Paris, both times (after /reset the model sees
    # the same single question).
    answers = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and answers[0] == answers[1], p.stdout
    assert "Paris" in answers[0]
    assert "conversation reset" in p.stderr
    assert "unknown command '/nope'" in p.stderr
    assert "ready: smollm2-135m-instruct" in p.stderr


class RecordingClient(ServerClient):
    """The real client against the real server; it also keeps what each turn sent."""

    sent: list[list[dict]] = []

    def stream_chat(self, model, messages, **params):
        RecordingClient.sent.append([dict(m) for m in messages])
        yield from super().stream_chat(model, messages, **params)


def test_history_grows_and_reset_drops_it(chat_server, monkeypatch):
    RecordingClient.sent = []
    monkeypatch.setattr("edgepack.client.ServerClient", RecordingClient)
    r = CliRunner().invoke(
        cli, ["chat", chat_server.base_url, "--system", "Answer briefly.", "--max-tokens", "8",
              "--seed", "3"],
        input="Hello!\nAnd again?\n/reset\nHi.\n")
    assert r.exit_code == 0, r.output
    first, second, third = RecordingClient.sent
    assert [m["role"] for m in first] == ["system", "user"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    # The assistant turn sent back is exactly what was streamed to the terminal.
    assert second[2]["content"].strip() and second[2]["content"] in r.stdout
    assert [m["role"] for m in third] == ["system", "user"] and third[1]["content"] == "Hi."


def test_a_wrong_url_or_target_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli, ["chat", "http://127.0.0.1:9"], input="hi\n")
    assert r.exit_code == 7
    assert "cannot reach the server at http://127.0.0.1:9" in r.output
    r = CliRunner().invoke(cli, ["chat", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "neither a bundle folder nor" in r.output


def test_help_lists_the_commands():
    assert "/reset" in chat_cli.HELP and "/exit" in chat_cli.HELP

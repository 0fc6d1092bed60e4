"""``GET /``: the server's status and chat page, one self-contained HTML document.

What the bundle is (model, device, plan, validation) is rendered here from the manifest;
readiness and live metrics come from ``/readyz`` and ``/metrics`` every two seconds; the chat
box streams from the server's own ``/v1/chat/completions``. No external assets: no CDN, no
fonts, no images (the page works on a device with no internet). With an API key the page sits
behind it like ``/v1``: a browser is asked for it (HTTP Basic, any user name, the key as the
password) and the page reuses the browser's own Authorization header for its API calls.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:.8em 1.2em}header h1{margin:0;font-size:1.2em}
main{display:grid;grid-template-columns:minmax(260px,1fr) 2fr;gap:1em;padding:1em;
max-width:1100px;margin:auto}@media(max-width:760px){main{grid-template-columns:1fr}}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:.8em 1em}
h2{font-size:1em;margin:.2em 0 .6em}dl{display:grid;grid-template-columns:auto 1fr;
gap:.2em .8em;margin:0}dt{color:#5b6475}dd{margin:0;word-break:break-all}
#state{font-weight:600}.ready{color:#137333}.wait{color:#b06000}.bad{color:#c5221f}
#log{height:22em;overflow-y:auto;border:1px solid #dde1e7;border-radius:6px;padding:.5em;
background:#fbfbfc}.msg{margin:.3em 0;white-space:pre-wrap}.user{color:#174ea6}
.assistant{color:#1d2330}.error{color:#c5221f}form{display:flex;gap:.5em;margin-top:.6em}
input[type=text]{flex:1;padding:.5em;border:1px solid #c4c9d2;border-radius:6px}
button{padding:.5em 1em;border:0;border-radius:6px;background:#1a73e8;color:#fff}
button.secondary{background:#5b6475}
"""

_SCRIPT = """
const AUTH = JSON.parse(document.getElementById('auth').textContent);
const MODEL = JSON.parse(document.getElementById('model').textContent);
const headers = Object.assign({'Content-Type': 'application/json'},
                              AUTH ? {'Authorization': AUTH} : {});
let history = [];
function line(cls, text) {
  const d = document.createElement('div'); d.className = 'msg ' + cls; d.textContent = text;
  const log = document.getElementById('log'); log.appendChild(d); log.scrollTop = 1e9;
  return d;
}
async function poll() {
  const st = document.getElementById('state');
  try {
    const r = await fetch('/readyz'); const j = await r.json();
    st.textContent = j.status; st.className = r.ok ? 'ready' : 'wait';
    const m = await (await fetch('/metrics')).text();
    const want = {edgepack_completion_tokens_total: 'tokens generated',
      edgepack_prompt_tokens_total: 'prompt tokens', edgepack_running_requests: 'running',
      edgepack_queue_depth: 'queued', edgepack_decode_tokens_per_second: 'last decode tok/s'};
    const out = [];
    const sums = {};
    for (const row of m.split('\\n')) {
      if (row.startsWith('#')) continue;
      const name = row.split(/[{ ]/)[0]; const v = parseFloat(row.split(' ').pop());
      if (name in want) sums[name] = (sums[name] || 0) + v;  // summed over the models
    }
    for (const k in sums) out.push([want[k], Math.round(sums[k] * 10) / 10]);
    document.getElementById('metrics').innerHTML = out.map(([k, v]) =>
      '<dt>' + k + '</dt><dd data-metric="' + k + '">' + v + '</dd>').join('');
  } catch (e) { st.textContent = 'unreachable'; st.className = 'bad'; }
}
async function send(ev) {
  ev.preventDefault();
  const box = document.getElementById('prompt'); const text = box.value.trim();
  if (!text) return;
  box.value = ''; line('user', text); history.push({role: 'user', content: text});
  const out = line('assistant', '');
  try {
    const r = await fetch('/v1/chat/completions', {method: 'POST', headers,
      body: JSON.stringify({model: MODEL, messages: history, stream: true, max_tokens: 256})});
    if (!r.ok) { const j = await r.json(); throw new Error(j.error ? j.error.message : r.status); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      const parts = buf.split('\\n'); buf = parts.pop();
      for (const p of parts) {
        if (!p.startsWith('data:')) continue;
        const data = p.slice(5).trim(); if (data === '[DONE]') continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        for (const c of j.choices || []) {
          if (c.delta && c.delta.content) out.textContent += c.delta.content;
        }
      }
    }
    history.push({role: 'assistant', content: out.textContent});
    out.dataset.done = '1';
  } catch (e) {
    history.pop(); out.className = 'msg error'; out.textContent = String(e.message || e);
  }
}
document.getElementById('chat').addEventListener('submit', send);
document.getElementById('reset').addEventListener('click', () => {
  history = []; document.getElementById('log').innerHTML = ''; });
poll(); setInterval(poll, 2000);
"""


def basic_password(credentials: bytes) -> bytes:
    """The password of HTTP Basic ``base64(user:password)`` credentials (b"" if malformed)."""
    try:
        return base64.b64decode(credentials, validate=True).partition(b":")[2]
    except (binascii.Error, ValueError):
        return b""


def _rows(items: list[tuple[str, Any]]) -> str:
    return "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                   for k, v in items if v not in (None, ""))


def _mib(n: Any) -> str:
    return f"{n / 2**20:,.0f} MiB" if isinstance(n, (int, float)) else ""


def render_page(manifest: dict[str, Any], config: Any, authorization: str | None) -> str:
    """The page for this server; ``authorization`` is the header the browser sent, if any."""
    model, plan = manifest.get("model", {}), manifest.get("plan", {})
    val, dev = manifest.get("validation", {}), manifest.get("device", {})
    mem = plan.get("memory", {})
    speed = (plan.get("speed") or {}).get("decode_tokens_per_second")
    verdict = "passed" if val.get("passed") else "FAILED"
    bundle = manifest.get("bundle", {})
    about = _rows([
        ("model", config.model_name), ("kind", config.model_kind),
        ("format", f"{model.get('format', config.model_format)} {config.quant}".strip()),
        ("size", _mib(model.get("size"))),
        ("bundle", f"{bundle.get('name', config.bundle_name)} v"
                   f"{bundle.get('version', config.bundle_version)}"),
        ("device", dev.get("profile_id")),
        ("engine", config.engine_name),
    ])
    plan_rows = _rows([
        ("context", f"{config.n_ctx} tokens"), ("threads", config.n_threads),
        ("GPU layers", config.n_gpu_layers),
        ("memory", f"{_mib(mem.get('required_bytes'))} of {_mib(mem.get('usable_bytes'))}"
                   if mem.get("required_bytes") else ""),
        ("decode (planned)", f"~{speed:.1f} tok/s" if isinstance(speed, (int, float)) else ""),
        ("validation", f"{val.get('metric')} {val.get('value')} {verdict}" if val else ""),
    ])
    # JSON inside <script type=application/json>: "</" escaped so it cannot close the tag.
    auth_json = json.dumps(authorization).replace("</", "<\\/")
    model_json = json.dumps(config.model_name).replace("</", "<\\/")
    title = html.escape(f"edgepack: {config.model_name}")
    chat = ("" if config.model_kind == "embedding" else
            '<section><h2>chat</h2><div id="log"></div><form id="chat">'
            '<input id="prompt" type="text" autocomplete="off" placeholder="Send a message">'
            '<button type="submit">Send</button>'
            '<button type="button" class="secondary" id="reset">Reset</button></form>'
            '</section>')
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{title}</h1></header><main><div>"
        f"<section><h2>status: <span id=\"state\" class=\"wait\">...</span></h2>"
        f"<dl>{about}</dl></section>"
        f"<section><h2>plan</h2><dl>{plan_rows}</dl></section>"
        f'<section><h2>live</h2><dl id="metrics"></dl></section></div>{chat}</main>'
        f'<script id="auth" type="application/json">{auth_json}</script>'
        f'<script id="model" type="application/json">{model_json}</script>'
        f"<script>{_SCRIPT}</script></body></html>"
    )


async def status_page(request: Request) -> HTMLResponse:
    """GET /: the page. Auth happened in the guard middleware, like for /v1."""
    from edgepack.manifest import load_manifest

    server = request.app.state.server
    # Several models: the page describes (and chats with) the first that can chat.
    config = next((m.config for m in server.models if m.config.model_kind != "embedding"),
                  server.config)
    try:
        manifest = load_manifest(config.bundle_dir)
    except Exception:  # noqa: BLE001 - the page still shows what server.toml says
        manifest = {}
    auth = request.headers.get("authorization") if server.config.api_key else None
    return HTMLResponse(render_page(manifest, config, auth),
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'self'; "
                                 "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

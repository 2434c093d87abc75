# JupyterLab's security settings for qlora-stack. The image installs this file as
# /etc/jupyter/jupyter_server_config.py, so every `jupyter lab` in it applies them (a
# --config=FILE on the command line would load FILE instead); on the host `make notebook`
# passes it with --config.
#
# The token: read from the file that JUPYTER_TOKEN_FILE names (compose mounts the secret
# `jupyter_token`, filled from JUPYTER_TOKEN in .env, at /run/secrets/jupyter_token), or, when
# there is none, a random 32-byte token printed once at start. It never appears in the process
# arguments or in the container's environment (`docker inspect` shows both), and it is never
# empty: an empty token turns authentication off. Tokens shorter than 32 characters are refused.
#
# jupyter_server >= 2 reads the token from IdentityProvider.token; the old NotebookApp.token
# and ServerApp.token settings are ignored or deprecated there.
import os
import secrets
import sys

MIN_TOKEN_CHARS = 32
TOKEN_BYTES = 32  # secrets.token_hex(32): 64 hex characters


def _say(message: str) -> None:
    print(f"[jupyter-config] {message}", file=sys.stderr, flush=True)


def read_token(environ=os.environ) -> tuple[str, bool]:
    """The token and whether it was generated here (False: it came from the secret file)."""
    if environ.get("JUPYTER_TOKEN"):
        _say(
            "ignoring JUPYTER_TOKEN in the environment (it shows in `docker inspect` and /proc); "
            "pass it as a file with JUPYTER_TOKEN_FILE (compose does this for JUPYTER_TOKEN in .env)"
        )
    path = environ.get("JUPYTER_TOKEN_FILE")
    token = ""
    if path and os.path.exists(path):  # a file, or a pipe (make notebook passes /dev/fd/N)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    if not token:
        return secrets.token_hex(TOKEN_BYTES), True
    if len(token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in token):
        # SystemExit, not an Exception: traitlets logs exceptions from config files and starts
        # anyway, which here would mean a server with a token nobody chose.
        raise SystemExit(
            f"[jupyter-config] the token in {path} is {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS} without spaces, e.g. JUPYTER_TOKEN=$(python3 -c 'import secrets; "
            "print(secrets.token_hex(32))') in .env, or leave it empty for a random one"
        )
    return token, False


def configure(c, environ=os.environ) -> None:
    token, generated = read_token(environ)
    c.IdentityProvider.token = token
    # Token only: no password can be set from the login page with the token.
    c.PasswordIdentityProvider.allow_password_change = False
    c.ServerApp.allow_root = False
    c.ServerApp.open_browser = False
    # Where the browser reaches the server: the host port compose publishes on 127.0.0.1.
    port = environ.get("NOTEBOOK_PORT") or "8888"
    url = f"http://127.0.0.1:{port}/lab"
    if generated:
        _say(f"JupyterLab: {url}?token={token}")
    else:
        _say(f"JupyterLab: {url}?token=<JUPYTER_TOKEN from .env>")


if "get_config" in globals():  # loaded by Jupyter (not imported by the tests)
    configure(get_config())  # noqa: F821 - provided by traitlets when it runs a config file

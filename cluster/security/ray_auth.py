"""Ray's token authentication for the operator cluster: the token file and the environment every Ray process needs.

Ray 2.55 turns token auth on with `RAY_AUTH_MODE=token` in the environment of every Ray process (head,
workers, drivers) and reads the token from `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`,
else `~/.ray/auth_token`. With it on, the GCS, raylets, the dashboard (its HTTP API, so `ray job submit`)
and the Ray Client server refuse callers without the token.

Nothing here touches the environment at import: the CLI's entry path calls `head_env`/`driver_env` and
then `apply_to_process`, which also makes an already-imported Ray re-read the variables (Ray reads them
into its C++ config once, when `ray` is imported).
"""

import logging
import os
import secrets
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cluster.config.serving import RaySection

logger = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_FILENAME = "ray-auth-token"
TOKEN_BYTES = 32  # 256 bits, as Ray's own generator (hex-encoded: 64 characters)
RAY_DEFAULT_TOKEN = Path("~/.ray/auth_token")


class RayAuthError(RuntimeError):
    """The token file is missing, empty or unsafe; the message says what to do."""


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where a driver found the cluster token: an env variable's name, or a file."""

    kind: str  # "env" (RAY_AUTH_TOKEN) or "file"
    path: Path | None = None


def token_path(section: RaySection, state_dir: Path) -> Path:
    """The token file `solanalm up` writes for a local head: settings, else <state dir>/ray-auth-token."""
    return (section.auth_token_path or state_dir / TOKEN_FILENAME).expanduser()


def ensure_token(path: Path, what: str = "Ray auth token") -> Path:
    """Create `path` with a fresh random token (mode 0600) unless it exists; return it.

    An existing file is kept (every node and tool already holds it), but one readable by group or others
    is tightened to 0600, and an empty one is an error. `what` names the token in logs and errors (the
    gateway's operator token is made the same way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _check_existing(path, what)
        return path
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(TOKEN_BYTES))
    logger.info("generated a %s in %s", what, path)
    return path


def _check_existing(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("%s was readable by others (mode %o); tightening it to 0600", path, mode)
        path.chmod(0o600)
    if not path.read_text().strip():
        raise RayAuthError(f"the {what} file {path} is empty; delete it and rerun `solanalm up`")


def find_token(section: RaySection, state_dir: Path, environ: Mapping[str, str] | None = None) -> TokenSource | None:
    """The token a driver joining a cluster uses, in order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the
    `ray.auth_token_path` setting, <state dir>/ray-auth-token, ~/.ray/auth_token; None when none exists."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return TokenSource("env")
    candidates = [Path(env[TOKEN_PATH_ENV])] if env.get(TOKEN_PATH_ENV) else []
    candidates += [token_path(section, state_dir), RAY_DEFAULT_TOKEN.expanduser()]
    for candidate in candidates:
        if candidate.expanduser().is_file():
            return TokenSource("file", candidate.expanduser())
    return None


def head_env(section: RaySection, state_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables for a local head that `solanalm up` starts (and for its driver): token auth on, the token
    created if missing. `ray.auth: disabled` adds nothing (the operator's own RAY_AUTH_* still apply)."""
    env = os.environ if environ is None else environ
    if section.auth == "disabled":
        return {}
    if env.get(TOKEN_ENV):  # the operator supplies the token itself; every child inherits it
        return {AUTH_MODE_ENV: "token"}
    path = Path(env[TOKEN_PATH_ENV]) if env.get(TOKEN_PATH_ENV) else token_path(section, state_dir)
    return {AUTH_MODE_ENV: "token", TOKEN_PATH_ENV: str(ensure_token(path.expanduser()))}


def driver_env(section: RaySection, state_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables for a driver joining a running cluster: token auth on when a token is found; else nothing
    (a cluster without auth still works, one with auth answers with Ray's AuthenticationError)."""
    if section.auth == "disabled":
        return {}
    source = find_token(section, state_dir, environ)
    if source is None:
        return {}
    env = {AUTH_MODE_ENV: "token"}
    if source.path is not None:
        env[TOKEN_PATH_ENV] = str(source.path)
    return env


def apply_to_process(env: Mapping[str, str]) -> bool:
    """Put `env` into this process's environment before it connects to Ray; False (and no change) when
    Ray is already connected here (a test's shared cluster, an embedding program): it cannot switch then."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        logger.debug("Ray is already initialized here; leaving its auth/TLS environment as it is")
        return False
    os.environ.update(env)
    if ray is not None and env:
        _reload_ray_config()
    return True


def _reload_ray_config() -> None:
    # Ray copies RAY_* variables into its C++ config when `ray` is imported and caches the token; this is
    # what Ray's own auth tests do to make a changed environment count (ray/_private/authentication_test_utils).
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    AuthenticationTokenLoader.instance().reset_cache()
    Config.initialize("")


def shell_exports(env: Mapping[str, str]) -> str:
    """`export K=V` lines for the operator's shell (`eval "$(solanalm ray-env)"`), values shell-quoted."""
    import shlex

    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())

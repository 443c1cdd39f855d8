"""Credentials: ``agentwatch agent-key`` (an agent's signing key) and ``agentwatch acl`` (Redis users
per role). docs/security.md says who holds which, and what each lets its holder do."""

from __future__ import annotations

import secrets as random_tokens
from typing import Annotated, Any
from urllib.parse import quote

import redis
import typer

from agentwatch.acl import DESCRIPTIONS, ROLES, rules, user_name
from agentwatch.cli import app
from agentwatch.cli.common import EXIT_USAGE, ConfigOption, client_for, fail, load_pipeline
from agentwatch.codec import name_problem
from agentwatch.keys import Keys
from agentwatch.signing import agent_key


@app.command("agent-key")
def agent_key_command(
    agent: Annotated[str, typer.Argument(help="The agent's name, exactly as it reports it.")],
    config: ConfigOption = None,
) -> None:
    """Print the key AGENT signs its events with (AGENTWATCH_KEY, or init(key=...)).

    It derives from [security] secret, so it needs that, and it speaks for AGENT only: give each
    agent its own. It is printed alone on stdout, for `export AGENTWATCH_KEY=$(agentwatch agent-key bot)`.
    """
    problem = name_problem(agent)
    if problem is not None:
        fail(f"not an agent name: {problem}", EXIT_USAGE)
    secret = load_pipeline(config, plugins=False).settings.security.secret
    if secret is None:
        fail(
            "agent keys derive from [security] secret, which is not set: set it in pipeline.toml "
            '(secret = "${AGENTWATCH_SECRET}") or as AGENTWATCH_SECURITY__SECRET',
            EXIT_USAGE,
        )
    typer.echo(agent_key(secret, agent))


RoleOption = Annotated[
    list[str] | None,
    typer.Option(
        "--role",
        metavar="<role>",
        help=f"Only this role (repeatable): {', '.join(ROLES)}.",
        show_default=False,
    ),
]


@app.command("acl")
def acl_command(
    config: ConfigOption = None,
    role: RoleOption = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Create or update the users on the Redis server.")
    ] = False,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="With --apply: new passwords for existing users.")
    ] = False,
) -> None:
    """Print (or --apply) one Redis ACL user per role: producer, detector, notifier, operator, http.

    Each may touch only the keys its role needs (docs/security.md). --apply needs an admin
    credential in [redis] url and Redis 7 or later; it prints the URL of each user it gives a
    password, once: hand it to that role (agents get the producer's).
    """
    pipeline = load_pipeline(config, plugins=False)
    chosen = role or list(ROLES)
    unknown = [name for name in chosen if name not in ROLES]
    if unknown:
        fail(f"unknown role {unknown[0]!r}; roles: {', '.join(ROLES)}", EXIT_USAGE)
    if rotate and not apply:
        fail("--rotate sets new passwords: use it with --apply", EXIT_USAGE)
    keys = pipeline.keys
    if not apply:
        typer.echo(
            f"# agentwatch roles for prefix {keys.prefix!r} (Redis 7+): docs/security.md says what each"
        )
        typer.echo(
            "# may do. `agentwatch acl --apply` creates them with passwords; or add `>PASSWORD` to each line."
        )
        for name in chosen:
            typer.echo(f"\n# {name}: {DESCRIPTIONS[name]}")
            words = ["ACL", "SETUSER", user_name(keys.prefix, name), *_RESET, *rules(keys, name), "on"]
            typer.echo(" ".join(f'"{word}"' if " " in word else word for word in words))
        return
    client = client_for(pipeline, name="agentwatch-acl")
    try:
        _apply(client, pipeline.settings.redis.url or "", keys, chosen, rotate)
    except redis.ResponseError as exc:
        fail(f"Redis refused: {exc} (--apply needs an admin credential in [redis] url, and Redis 7 or later)")
    finally:
        client.close()


_RESET = ("resetkeys", "resetchannels", "clearselectors", "-@all")


def _apply(client: Any, configured_url: str, keys: Keys, chosen: list[str], rotate: bool) -> None:
    url = configured_url or client_url(client)
    for name in chosen:
        user = user_name(keys.prefix, name)
        existing = client.execute_command("ACL", "GETUSER", user)
        client.execute_command("ACL", "SETUSER", user, *_RESET, *rules(keys, name), "on")
        has_password = bool(existing) and bool(_field(existing, "passwords"))
        if has_password and not rotate:
            typer.echo(f"{name:<9} {user}: rules updated, password kept (--rotate for a new one)")
            continue
        password = random_tokens.token_urlsafe(24)
        client.execute_command("ACL", "SETUSER", user, "resetpass", f">{password}")
        typer.echo(f"{name:<9} {with_credentials(url, user, password)}")
    for command, where in ((("ACL", "SAVE"), "the server's ACL file"), (("CONFIG", "REWRITE"), "redis.conf")):
        try:
            client.execute_command(*command)
        except redis.ResponseError:
            continue
        typer.echo(f"saved to {where}")
        return
    typer.echo("kept in memory only (no ACL file, no config file): a restart of Redis forgets these users; "
               "put the lines `agentwatch acl` prints in your ACL file", err=True)  # fmt: skip


def _field(reply: Any, name: str) -> Any:
    """One field of an ``ACL GETUSER`` reply (a flat list in RESP2, a map in RESP3)."""
    if isinstance(reply, dict):
        return reply.get(name, reply.get(name.encode()))
    pairs = dict(zip(reply[::2], reply[1::2], strict=False))
    return pairs.get(name, pairs.get(name.encode()))


def client_url(client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with this user and password in place of any it had."""
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/") if scheme != "unix" else ("", "", rest)
    host = netloc.rpartition("@")[2]
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    if scheme == "unix":
        return f"unix://{auth}{tail}"
    return f"{scheme}://{auth}{host}{slash}{tail}"

"""The one check that a production deployment is not running on development settings.

``radq api``, ``radq worker``, ``radq scp`` and ``radq flower`` call
:func:`ensure_deployable` before they start. In development (``RADQ_ENV=development``,
the default) nothing is checked: the embedded mode and the tests run with SQLite, a
generated pseudonym key and, for the demo, auth off.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from radq.errors import ConfigurationError
from radq.settings import Settings

KNOWN_DEFAULT_KEYS = frozenset(
    {"", "radq", "secret", "changeme", "change-me", "change_me", "development", "dev", "test", "key",
     "password", "pseudonym", "pseudonym-key", "default"}
)  # fmt: skip
"""Pseudonym keys found in examples and habits; a production key must be none of them."""

MIN_KEY_LENGTH = 32
"""Shortest RADQ_PSEUDONYM_KEY accepted in production (``secrets.token_urlsafe(32)`` gives 43)."""

COMPOSE_PASSWORD = "radq"
"""The PostgreSQL password docker-compose.yml ships with."""


def production_problems(settings: Settings) -> list[str]:
    """What keeps ``settings`` from being used in production, each naming the variable to set.

    Returns:
        One line per problem; empty when the settings are fit (or in development).
    """
    if settings.env != "production":
        return []
    problems: list[str] = []
    if not settings.auth:
        problems.append("RADQ_AUTH is false: API tokens must be required (set RADQ_AUTH=true)")
    key = settings.pseudonym_key.get_secret_value() if settings.pseudonym_key else None
    generate = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if key is None:
        problems.append(
            f"RADQ_PSEUDONYM_KEY is not set: set it to a random secret ({generate}), the same on every host"
        )
    elif key.strip().lower() in KNOWN_DEFAULT_KEYS:
        problems.append(f"RADQ_PSEUDONYM_KEY is a well-known default: set a random secret ({generate})")
    elif len(key) < MIN_KEY_LENGTH:
        problems.append(
            f"RADQ_PSEUDONYM_KEY has {len(key)} characters, fewer than {MIN_KEY_LENGTH}: set a random "
            f"secret ({generate})"
        )
    url = settings.resolved_database_url
    try:
        parsed = make_url(url)
    except ArgumentError:
        problems.append("RADQ_DATABASE_URL is not a database URL: set a PostgreSQL URL")
    else:
        if parsed.get_backend_name() == "sqlite":
            where = "the default SQLite file under RADQ_HOME" if not settings.database_url else "SQLite"
            problems.append(
                f"RADQ_DATABASE_URL is {where}: set a PostgreSQL URL "
                "(postgresql://user:password@host/db); SQLite serves one host and no concurrent writers"
            )
        elif parsed.password == COMPOSE_PASSWORD:
            problems.append(
                f"RADQ_DATABASE_URL uses the password {COMPOSE_PASSWORD!r} from docker-compose.yml: "
                "set a URL with a real password"
            )
    return problems


def ensure_deployable(settings: Settings, command: str) -> None:
    """Refuse to run ``command`` in production with development settings.

    Raises:
        ConfigurationError: one message listing every problem and the variable to set.
    """
    problems = production_problems(settings)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigurationError(
            f"radq {command} will not start with RADQ_ENV=production:\n{lines}\n"
            "(RADQ_ENV=development runs without these checks, for a single machine only)"
        )

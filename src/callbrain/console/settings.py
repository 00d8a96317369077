"""The ``console:`` setting of an agent file's ``server:`` block.

::

    server:
      console: true                              # on; a login token is made at start-up
      console:
        token: ${CALLBRAIN_CONSOLE_TOKEN}        # or choose it (16+ characters)
        allow_loopback_without_token: false

Off unless set. Checked when the agent file is loaded, like the rest of ``server:``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

PATH = "/console"
"""Where the console is served, on the server's own port."""


class ConsoleSettings(BaseModel):
    """The web console: recent and live calls, one call's waterfall, a playground."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Within a ``console:`` mapping the console is on unless this says otherwise."""
    token: SecretStr | None = None
    """What the login form asks for; compared in constant time, never logged or
    shown. None: a random one is made when the server starts and logged once."""
    allow_loopback_without_token: bool = False
    """Requests from loopback (127.0.0.0/8, ::1) need no login. A proxy on the
    same host must then be in ``server.access.trusted_proxies``; a request from
    loopback that carries forwarding headers from an untrusted peer still has to
    log in."""
    session_hours: float = Field(default=12.0, gt=0)
    """How long a login lasts. Sessions also end when the server restarts."""
    secure_cookie: bool | None = None
    """Mark the session cookie ``Secure``. None: when the request came over https;
    set it to true behind a proxy that terminates TLS."""
    origins: list[str] = Field(default_factory=list)
    """Extra origins (``https://console.example.com``) whose requests are same-site,
    for a proxy that rewrites the ``Host`` header. By default only the server's own
    ``Host`` is."""
    login_attempts_per_minute: int = Field(default=10, ge=1)
    """Failed logins allowed per client address per minute; beyond, 429."""

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        from callbrain.server.settings import _not_blank

        return _not_blank(value)

    @field_validator("origins")
    @classmethod
    def _plain_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, _, rest = origin.partition("://")
            if scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/"):
                raise ValueError(f"{origin!r} is not an origin like https://console.example.com")
        return [origin.rstrip("/").lower() for origin in value]


def console_settings(value: ConsoleSettings | bool) -> ConsoleSettings | None:
    """The settings in force: None when the console is off."""
    if value is False:
        return None
    settings = ConsoleSettings() if value is True else value
    return settings if settings.enabled else None

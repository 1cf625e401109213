"""Who may call what: the roles, the bearer tokens a server accepts (from settings), the token a client sends, the
check the server's interceptor runs per call, and the rule that a server off loopback never runs without tokens.

Roles are ordered, each including the ones before it: `generate` (app backends: generation, jobs, preference
pairs) < `worker` (the curation tier and service-to-service calls: caption, score, tag, embed, check) < `admin`
(model versions, head fits, cluster fits, training runs). Every servicer declares the role of each of its methods in
its `ROLES` table; a method that has none is admin-only here, and `service_definition` refuses to build a service
whose table misses one of its methods. Health and reflection are open to everyone.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool

from pony_common.config import ConfigError, Settings

# Health and reflection stay open without a token: Kubernetes probes and grpcurl send none.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class Role(enum.StrEnum):
    """A caller's role; a role includes every role before it in this list."""

    GENERATE = "generate"
    WORKER = "worker"
    ADMIN = "admin"

    def includes(self, other: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(other)


def parse_role(text: str, where: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise ConfigError(f"{where}: {text.strip()!r} is not a role; use one of {', '.join(Role)}") from None


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens a server accepts, each with its role."""

    roles: dict[str, Role] = field(default_factory=dict, repr=False)  # token -> role: never in a log line

    def __bool__(self) -> bool:
        return bool(self.roles)

    def role_of(self, token: str) -> Role | None:
        """The role of `token` (compared in constant time with every known token), or None."""
        found = None
        supplied = token.encode()
        for known, role in self.roles.items():
            if hmac.compare_digest(supplied, known.encode()):
                found = role
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        """PONY_AUTH_TOKENS, PONY_AUTH_TOKENS_FILE and the legacy PONY_AUTH_TOKEN (an admin token) together;
        ConfigError naming the setting for an unknown role, an empty token or one token given two roles."""
        pairs: list[tuple[Role, str, str]] = []
        if settings.auth_tokens.strip():
            pairs += _parse_pairs(settings.auth_tokens, "PONY_AUTH_TOKENS")
        if settings.auth_tokens_file:
            pairs += _read_tokens_file(Path(settings.auth_tokens_file))
        if settings.auth_token.strip():
            pairs.append((Role.ADMIN, settings.auth_token.strip(), "PONY_AUTH_TOKEN"))
        roles: dict[str, Role] = {}
        for role, token, where in pairs:
            if roles.get(token, role) is not role:
                raise ConfigError(
                    f"{where}: one token is given two roles ({roles[token]} and {role}); use one per role"
                )
            roles[token] = role
        return cls(roles)


def _parse_pairs(text: str, where: str) -> list[tuple[Role, str, str]]:
    out = []
    for entry in text.replace("\n", ",").split(","):
        if not entry.strip():
            continue
        role, sep, token = entry.strip().partition(":")
        if not sep:
            raise ConfigError(f"{where}: entries are role:token (roles: {', '.join(Role)}); one has no ':'")
        out.append((parse_role(role, where), _nonempty(token, f"{where}: role {role.strip()}"), where))
    return out


def _nonempty(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise ConfigError(f"{where} has an empty token")
    return token


def _read_tokens_file(path: Path) -> list[tuple[Role, str, str]]:
    """A folder (a mounted Secret: one file per role, named by it) or a file of role:token lines."""
    where = f"PONY_AUTH_TOKENS_FILE={path}"
    try:
        if path.is_dir():
            # A Secret volume also holds `..data` links and timestamped folders: only the role files count.
            files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
            return [(parse_role(p.name, where), _nonempty(p.read_text(), f"{where}: {p.name}"), where) for p in files]
        return _parse_pairs(path.read_text(), where)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None


def client_token(settings: Settings) -> str:
    """The bearer token this process sends: PONY_CLIENT_TOKEN, else PONY_CLIENT_TOKEN_FILE's content, else the
    legacy PONY_AUTH_TOKEN; "" sends none."""
    if settings.client_token:
        return settings.client_token.strip()
    if settings.client_token_file:
        path = Path(settings.client_token_file)
        try:
            return _nonempty(path.read_text(), f"PONY_CLIENT_TOKEN_FILE={path}")
        except OSError as exc:
            raise ConfigError(f"PONY_CLIENT_TOKEN_FILE={path}: cannot read it: {exc.strerror or exc}") from None
    return settings.auth_token.strip()


def method_roles(full_name: str, table: Mapping[str, Role] | None) -> dict[str, Role]:
    """`table` (method name -> role, a servicer's `ROLES`) keyed by the full method path (`/pony.v1.Sampler/Generate`);
    ValueError unless it names every method of service `full_name`, and nothing else."""
    methods = {m.name for m in descriptor_pool.Default().FindServiceByName(full_name).methods}
    table = dict(table or {})
    missing, unknown = sorted(methods - set(table)), sorted(set(table) - methods)
    if missing or unknown:
        raise ValueError(
            f"{full_name}: every method declares its role in its servicer's ROLES table; "
            f"without one: {missing or 'none'}; not methods: {unknown or 'none'}"
        )
    return {f"/{full_name}/{name}": Role(role) for name, role in table.items()}


@dataclass(frozen=True)
class Authorizer:
    """The per-call check: which token, which role, which method. With no tokens every call passes (loopback)."""

    tokens: Tokens
    roles: Mapping[str, Role]

    def check(self, method: str, metadata: Mapping[str, str]) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to abort it with."""
        if not self.tokens or method.startswith(OPEN_SERVICES):
            return None
        supplied = metadata.get("authorization", "")
        if not supplied.lower().startswith("bearer "):
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
        role = self.tokens.role_of(supplied[7:].strip())
        if role is None:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        needed = self.roles.get(method, Role.ADMIN)  # a method without a declared role is admin-only
        if not role.includes(needed):
            return grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the {needed} role; this token has {role}"
        return None


def is_loopback(host: str) -> bool:
    """Whether a bind host is reachable only from this machine (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_credentials(settings: Settings, service: str, address: str) -> Tokens:
    """The server's tokens; ConfigError (one line, naming the fix) when it would listen off loopback without any."""
    tokens = Tokens.from_settings(settings)
    host = address.rsplit(":", 1)[0]
    if not tokens and not is_loopback(host):
        raise ConfigError(
            f"{service} refuses to listen on {address} without credentials: set PONY_AUTH_TOKENS or "
            "PONY_AUTH_TOKENS_FILE (role:token), or bind 127.0.0.1 (PONY_BIND_HOST)"
        )
    return tokens

"""Who may call the daemon: TLS (optionally with client certificates) and bearer tokens with scopes.

The daemon's tokens live in a file, one per line, `read TOKEN`, `write TOKEN` or `replicate TOKEN`
(a line whose first non-blank character is `#` is a comment; nothing may follow a token, so a `#`
inside a token is part of it). A read token may look rows up, describe, read stats and watch the
rows pushes change (`WatchRows`: what a device cache needs to stay coherent, rows only); a write
token may also push and snapshot; a replicate token may read, `Follow` and report what it holds
(`ConfirmDurable`, counted by --sync-replicas). Follow is a scope of
its own, implied by neither: a follower receives every push (row ids, optimizer state, who pushed)
and holds a --max-followers slot, which a reader or a trainer has no need for. Calls without a
valid token get UNAUTHENTICATED, a token outside its scope PERMISSION_DENIED; both are counted
(`memstore_auth_refused_total`) and logged (rate-limited, never the token). The file, and TLS
keys, must not be readable by group or others (`chmod 600`). The gRPC health service answers without a token, as
orchestrators' probes expect (it tells nothing about the table). Tokens are kept as SHA-256
digests and compared in constant time.

The client side (`ClientTls`, `open_channel`) is here too: clients, replicas following a
primary and the command line all connect the same way.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from memstore.errors import InvalidArgumentError

log = logging.getLogger("memstore.auth")

METADATA_KEY = "authorization"
TOKEN_ENV = "MEMSTORE_TOKEN"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Methods that change the table or write files on the daemon's host.
WRITE_METHODS = frozenset({"Push", "Snapshot"})
# Methods that stream the table's changes to a replica.
REPLICATE_METHODS = frozenset({"Follow", "ConfirmDurable", "StreamSnapshot"})  # reports, re-seeds
# Seconds between two log lines about refused calls (the ones between are counted in the next).
REFUSAL_LOG_INTERVAL_S = 10.0


class Scope(enum.Enum):
    """What a token may do."""

    READ = "read"
    WRITE = "write"  # read and write
    REPLICATE = "replicate"  # read and Follow

    def allows(self, method: str) -> bool:
        """Whether this scope may call `method` (its short name: Push, Follow, ...)."""
        if method in WRITE_METHODS:
            return self is Scope.WRITE
        if method in REPLICATE_METHODS:
            return self is Scope.REPLICATE
        return True


@dataclass(frozen=True)
class TlsConfig:
    """The daemon's certificate and key (PEM files); with `client_ca`, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = [(_read(self.key, "TLS key", private=True), _read(self.cert, "TLS certificate"))]
        roots = None if self.client_ca is None else _read(self.client_ca, "client CA")
        return grpc.ssl_server_credentials(pair, root_certificates=roots, require_client_auth=roots is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate, key and client CA for Python's ssl (the data plane's TLS)."""
        _read(self.key, "TLS key", private=True)  # refused as gRPC refuses it when others may read it
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=_read(self.client_ca, "client CA").decode())
        return context


class TokenTable:
    """Token digests and their scopes."""

    def __init__(self, tokens: dict[str, Scope]) -> None:
        if not tokens:
            raise InvalidArgumentError("a token table needs at least one token")
        self._digests = {_digest(token): scope for token, scope in tokens.items()}

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        """Parse `read TOKEN` / `write TOKEN` / `replicate TOKEN` lines; anything else (a trailing
        comment, a token given twice) is an error naming the line, never the token."""
        tokens: dict[str, Scope] = {}
        lines: dict[str, int] = {}
        for number, parts in _token_lines(path):
            if len(parts) != 2 or parts[0] not in {s.value for s in Scope}:
                raise InvalidArgumentError(
                    f"{path} line {number}: expected `read TOKEN`, `write TOKEN` or `replicate TOKEN` "
                    "(comments go on lines of their own, starting with #)"
                )
            if len(parts[1]) < 16:
                raise InvalidArgumentError(f"{path} line {number}: a token must have at least 16 characters")
            check_token(parts[1], f"{path} line {number}")
            if parts[1] in tokens:  # which scope it has would depend on the line order
                raise InvalidArgumentError(
                    f"{path} line {number}: this token is already on line {lines[parts[1]]}; give each token "
                    "one line (and one scope)"
                )
            tokens[parts[1]] = Scope(parts[0])
            lines[parts[1]] = number
        return cls(tokens)

    def scope(self, token: str) -> Scope | None:
        """The token's scope, or None for an unknown token (constant-time comparison)."""
        digest = _digest(token)
        found = None
        for known, scope in self._digests.items():
            if hmac.compare_digest(known, digest):
                found = scope
        return found


class TokenInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer TOKEN` on every call before the servicer sees it; each refusal
    is passed to `on_refusal(method, reason)` (reason: missing, invalid or scope) and logged at most
    once per REFUSAL_LOG_INTERVAL_S."""

    def __init__(self, tokens: TokenTable, on_refusal: Callable[[str, str], None] | None = None) -> None:
        self._tokens = tokens
        self._on_refusal = on_refusal
        self._log_lock = threading.Lock()
        self._last_logged = -REFUSAL_LOG_INTERVAL_S
        self._unlogged = 0

    def _refused(self, method: str, reason: str) -> None:
        if self._on_refusal is not None:
            self._on_refusal(method, reason)
        with self._log_lock:
            self._unlogged += 1
            now = time.monotonic()
            if now - self._last_logged < REFUSAL_LOG_INTERVAL_S:
                return
            count, self._unlogged, self._last_logged = self._unlogged, 0, now
        log.warning(
            "refused a %s call: %s token%s",
            method,
            reason,
            f" ({count - 1} more refusals since the last line)" if count > 1 else "",
        )

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method.startswith(_HEALTH_PREFIX):
            return continuation(details)
        presented = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        scheme, _, token = presented.partition(" ")
        scope = self._tokens.scope(token) if scheme.lower() == "bearer" and token else None
        short = method.rsplit("/", 1)[-1]
        if scope is None:
            handler = continuation(details)
            # The label is the method only for methods this daemon serves: callers choose the name.
            self._refused(short if handler is not None else "unknown", "invalid" if presented else "missing")
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid bearer token is required (ClientConfig.token, or `authorization: Bearer TOKEN` metadata)",
            )
        if not scope.allows(short):
            handler = continuation(details)
            self._refused(short if handler is not None else "unknown", "scope")
            if short in REPLICATE_METHODS:
                message = (
                    f"{short} needs a replicate token; this is a {scope.value} token. Add a line `replicate TOKEN` "
                    "to this daemon's --token-file and give the replica that token (--follow-token-file)"
                )
            else:
                message = f"{short} needs a write token; this is a {scope.value} token"
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, message)
        return continuation(details)


@dataclass(frozen=True)
class ClientTls:
    """TLS as a client: the CA that signed the daemon's certificate (PEM; None: the system's
    roots), this client's own certificate and key for daemons that require one (mutual TLS),
    and the name to expect in the daemon's certificate when it differs from the address's host."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgumentError("a client certificate needs its key and the key its certificate; give both")

    def ssl_context(self) -> ssl.SSLContext:
        """The same CA and client certificate for Python's ssl (the data plane's TLS)."""
        context = ssl.create_default_context(cadata=None if self.ca is None else _read(self.ca, "TLS CA").decode())
        if self.cert is not None and self.key is not None:
            _read(self.key, "TLS key", private=True)
            context.load_cert_chain(self.cert, self.key)
        return context

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read(self.ca, "TLS CA"),
            private_key=None if self.key is None else _read(self.key, "TLS key", private=True),
            certificate_chain=None if self.cert is None else _read(self.cert, "TLS certificate"),
        )


def open_channel(
    target: str, options: Sequence[tuple[str, object]], tls: ClientTls | None = None, token: str | None = None
) -> grpc.Channel:
    """A channel to `target`: TLS when `tls` is given, and `authorization: Bearer token` on every call."""
    check_target(target)
    options = list(options)
    if tls is None and token is not None and not _is_local_target(target):
        log.warning(
            "sending a bearer token to %s without TLS: anyone on the path can read it and use it; connect with "
            "TLS (ClientConfig.tls, --tls-ca) or to a loopback address",
            target,
        )
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        if tls.server_name is not None:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(target, tls.credentials(), options=options)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(token))


# gRPC target schemes passed through as they are (a Unix socket, a DNS name, a list of IPs, ...).
_TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")


def check_target(target: str) -> None:
    """InvalidArgumentError unless `target` is HOST:PORT with a port from 1 to 65535, or a gRPC
    target with a scheme. gRPC itself would dial 127.0.0.1:99999 as port 34463 (whatever listens
    there, another daemon included) and a bare host on port 443."""
    if target.startswith(_TARGET_SCHEMES):
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(
            f"{target!r} is not a daemon's address: expected HOST:PORT with a port from 1 to 65535 "
            "(e.g. 127.0.0.1:50051), or a gRPC target such as unix:/path/to/socket or dns:///host:port"
        )


def read_token(path: Path | None) -> str | None:
    """A client's token: the first non-comment line of `path`, else $MEMSTORE_TOKEN, else None."""
    if path is None:
        # `export MEMSTORE_TOKEN="$(cat file)"` drops the newline, other ways keep it: drop it here.
        token = os.environ.get(TOKEN_ENV, "").rstrip("\r\n")
        if token:
            check_token(token, f"${TOKEN_ENV}")
        return token or None
    for number, parts in _token_lines(path):
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in {s.value for s in Scope}):
            raise InvalidArgumentError(
                f"{path} line {number}: expected the token alone, or a daemon's `SCOPE TOKEN` line (comments go on "
                "lines of their own, starting with #)"
            )
        check_token(parts[-1], f"{path} line {number}")
        return parts[-1]  # a daemon's `read TOKEN` line works as well as the bare token
    raise InvalidArgumentError(f"the token file {path} holds no token")


def check_token(token: str, where: str = "the token") -> None:
    """InvalidArgumentError unless `token` can travel as a bearer token: printable ASCII without
    spaces (gRPC refuses other metadata only when the call is made, as "Invalid metadata").
    The message names the first bad character's position and kind, never the token."""
    for position, char in enumerate(token):
        if not "!" <= char <= "~":
            kind = "a newline" if char in "\r\n" else "whitespace" if char.isspace() else f"character U+{ord(char):04X}"
            hint = " (strip the newline of the file it was read from)" if char in "\r\n" else ""
            raise InvalidArgumentError(
                f"{where}: a token holds printable ASCII characters only, without spaces; it has {kind} at "
                f"position {position}{hint}"
            )
    if not token:
        raise InvalidArgumentError(f"{where}: the token is empty")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name and --token-file, for commands that call a daemon."""
    group = parser.add_argument_group("connecting to a daemon with TLS or a token")
    group.add_argument(
        "--tls-ca", type=Path, help="connect with TLS; the CA (PEM) that signed the daemon's certificate"
    )
    group.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for daemons that require one")
    group.add_argument("--tls-key", type=Path, help="this client's key (PEM)")
    group.add_argument("--tls-server-name", help="the name in the daemon's certificate, when not the address's host")
    group.add_argument("--token-file", type=Path, help=f"a file holding the bearer token (default: ${TOKEN_ENV})")


def client_security(args: argparse.Namespace) -> tuple[ClientTls | None, str | None]:
    """(TLS, token) from the arguments `add_client_arguments` added."""
    wants_tls = any(getattr(args, name) is not None for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"))
    tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if wants_tls else None
    return tls, read_token(args.token_file)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        check_token(token)
        self._metadata = (METADATA_KEY, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT listens on loopback only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "0.0.0.0"-like wildcards spelled otherwise: assume public


def _is_local_target(target: str) -> bool:
    """Whether a channel target stays on this host (a Unix socket or a loopback address)."""
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return all(is_loopback(part) for part in target[len(scheme) :].split(","))
    return is_loopback(target)


def exposure_warning(address: str, tls: TlsConfig | None, token_file: Path | None) -> str | None:
    """The warning a daemon logs on start when other hosts can reach it and nothing guards its
    writes, or its tokens travel in plaintext (None when loopback-only or guarded)."""
    if is_loopback(address) or address.startswith(("unix:", "unix-abstract:")):
        return None
    if tls is None and token_file is None:
        return (
            f"LISTENING ON {address} WITHOUT TLS OR TOKENS: anyone who can reach this port can read the table "
            "and train it (push). Give --token-file (and --tls-cert/--tls-key), or listen on 127.0.0.1 "
            "behind your own network policy."
        )
    if tls is not None and tls.client_ca is None and token_file is None:
        return (
            f"LISTENING ON {address} WITH TLS BUT NEITHER TOKENS NOR CLIENT CERTIFICATES: TLS encrypts, it does "
            "not say who may call; anyone who can reach this port can read the table, push and snapshot. Give "
            "--token-file or --tls-client-ca."
        )
    if tls is None:
        return (
            f"LISTENING ON {address} WITH TOKENS BUT WITHOUT TLS: tokens travel in plaintext and anyone on the "
            "path can read and reuse them. Give --tls-cert/--tls-key."
        )
    return None


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as `handler` that aborts every call with `code`."""

    def abort(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
        return None
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, words) of each line of a token file that is neither blank nor a comment (a
    line starting with `#`; a `#` elsewhere is part of a word)."""
    for number, line in enumerate(_read(path, "token file", private=True).decode().splitlines(), 1):
        words = line.split()
        if words and not words[0].startswith("#"):
            yield number, words


def _read(path: Path, what: str, private: bool = False) -> bytes:
    """The file's bytes; with `private`, InvalidArgumentError when group or others may access it."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if private and mode & 0o077:
                raise InvalidArgumentError(
                    f"the {what} {path} is open to group or others (mode {stat.S_IMODE(mode):04o}): anyone on this "
                    f"host could read the secret in it; run `chmod 600 {path}`"
                )
            return file.read()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the {what} {path}: {exc.strerror}") from None

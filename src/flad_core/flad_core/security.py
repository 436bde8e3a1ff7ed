"""ZeroMQ CURVE security: key pairs, allow-lists, and socket setup.

Every link can run encrypted and authenticated (CURVE). Servers (the bus hub, control and weight
endpoints) accept only clients whose public key is in an allow-list folder; pyzmq's ZAP
authenticator does the checking, and each refusal is logged. `flad keys generate` makes key pairs
in ZeroMQ's certificate format.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from flad_core.config import ConfigError

log = logging.getLogger(__name__)


class SecurityError(RuntimeError):
    """Keys are missing or unreadable, or a peer was refused."""


@dataclass
class SecurityConfig:
    """CURVE settings of one process. With `curve: false` every link is plain TCP (loopback demos).

    A client must know the public key of the server it connects to: `server_keys` names it per server address
    (a vehicle's control socket: that vehicle's key; the cloud's services: the cloud's), `server` is the key of
    every other address (the edge: hub and services). `flad_core.roles.security_for` fills `server_keys` from
    the fleet; entries given in the fleet file win."""

    curve: bool = False
    keys_dir: Path = Path("runs/keys")   # holds <name>.key (public) and <name>.key_secret
    identity: str = ""                   # this process's key name; default: its role id
    server: str = "edge"                 # key name of the servers this process connects to
    allow_dir: Path | None = None        # public keys allowed to connect to this process's servers
    server_keys: dict[str, str] = field(default_factory=dict)   # server address -> its key name (else `server`)

    def validate(self) -> None:
        if self.curve and not str(self.keys_dir):
            raise ConfigError("keys_dir", "must be set when curve is true")
        if self.curve and not (self.allow_dir and str(self.allow_dir)):
            raise ConfigError("allow_dir", "must be set when curve is true (the folder of public keys allowed to "
                                           "connect; without it a CURVE server would take any key)")

    def server_key(self, address: str) -> str:
        """Key name of the server at `address`."""
        return self.server_keys.get(address, self.server)


def require_allow_list(cfg: SecurityConfig, what: str) -> Path:
    """The allow-list folder a CURVE server `what` checks its clients against; SecurityError without one."""
    if not (cfg.allow_dir and str(cfg.allow_dir)):
        raise SecurityError(f"{what}: security.allow_dir is not set; a CURVE server without an allow-list would "
                            "accept any client key")
    return Path(cfg.allow_dir)


def generate_keypair(keys_dir: str | Path, name: str, allow_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write `<name>.key` and `<name>.key_secret` to `keys_dir`; copy the public key to `allow_dir`."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(keys_dir), name)
    Path(secret).chmod(0o600)
    if allow_dir is not None:
        Path(allow_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(public, Path(allow_dir) / Path(public).name)
    return Path(public), Path(secret)


def load_keypair(keys_dir: str | Path, name: str) -> tuple[bytes, bytes]:
    """(public, secret) of key `name`; SecurityError naming the file if absent or malformed."""
    path = Path(keys_dir) / f"{name}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot load CURVE key pair {path}: {exc}") from exc
    if secret is None:
        raise SecurityError(f"{path} has no secret key")
    return public, secret


def load_public(keys_dir: str | Path, name: str) -> bytes:
    path = Path(keys_dir) / f"{name}.key"
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot load CURVE public key {path}: {exc}") from exc
    return public


class CurveAuthority:
    """Owns the ZAP authenticator of one zmq.Context. ZeroMQ allows one ZAP handler per context, so
    servers sharing a context share it: use `CurveAuthority.for_context`."""

    _by_context: ClassVar[dict[int, CurveAuthority]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_context(cls, context: zmq.Context, allow_dir: str | Path) -> CurveAuthority:
        with cls._lock:
            auth = cls._by_context.get(id(context))
            if auth is None:
                auth = cls._by_context[id(context)] = cls(context, allow_dir)
            elif Path(allow_dir) != auth.allow_dir:
                raise SecurityError(f"one process cannot use two allow-lists ({auth.allow_dir}, {allow_dir})")
            auth.users += 1
            return auth

    def __init__(self, context: zmq.Context, allow_dir: str | Path) -> None:
        allow = Path(allow_dir)
        if not allow.is_dir():
            raise SecurityError(f"CURVE allow-list folder {allow} does not exist")
        self.allow_dir = allow
        self.users = 0
        self._context = context
        self.allowed: set[bytes] = set()
        self.refused = 0
        self.reload()
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("flad_core.security.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        log.info("CURVE authenticator on, %d allowed key(s) in %s", len(self.allowed), allow)

    def reload(self) -> None:
        """Re-read the allow-list folder (after adding or removing a vehicle's key)."""
        keys = set()
        for path in sorted(self.allow_dir.glob("*.key")):
            public, _ = zmq.auth.load_certificate(str(path))
            keys.add(public)
        self.allowed = keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP decision for one connecting peer (pyzmq calls this with the z85 public key)."""
        if client_key in self.allowed:
            return True
        self.refused += 1
        log.warning("refused a CURVE peer with unknown public key %s (not in %s)", client_key.decode(), self.allow_dir)
        return False

    def stop(self) -> None:
        """Release one user; the authenticator stops with its last user."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            self._by_context.pop(id(self._context), None)
        self._auth.stop()


def make_server(sock: zmq.Socket, cfg: SecurityConfig, identity: str) -> None:
    """Turn `sock` into a CURVE server with this process's key (call before bind)."""
    public, secret = load_keypair(cfg.keys_dir, cfg.identity or identity)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True


def make_client(sock: zmq.Socket, cfg: SecurityConfig, identity: str, server: str | None = None) -> None:
    """Turn `sock` into a CURVE client of `server`'s public key (call before connect)."""
    public, secret = load_keypair(cfg.keys_dir, cfg.identity or identity)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = load_public(cfg.keys_dir, server or cfg.server)


# --- CLI -----------------------------------------------------------------------------------------

def _cmd_generate(args: argparse.Namespace) -> int:
    for name in args.names:
        public, secret = generate_keypair(args.out, name, args.allow)
        print(f"{name}: public {public}  secret {secret}")
    if args.allow:
        print(f"public keys copied to allow-list {args.allow}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`flad keys generate NAME...`."""
    keys = subparsers.add_parser(
        "keys", help="generate CURVE key pairs for encrypted, authenticated links",
        description="Manage ZeroMQ CURVE keys. Each process (vehicle, edge, cloud) has a key pair; a server "
                    "accepts only clients whose public key is in its allow-list folder.")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = ksub.add_parser("generate", help="write <name>.key and <name>.key_secret for each name")
    gen.add_argument("names", nargs="+", help="key names, e.g. edge v1 v2")
    gen.add_argument("--out", type=Path, default=Path("runs/keys"), help="folder for the key files (default runs/keys)")
    gen.add_argument("--allow", type=Path, default=None,
                     help="also copy each public key into this allow-list folder")
    gen.set_defaults(func=_cmd_generate)

"""What proves the Temporal connection's TLS, mTLS and API key on a real connection: throwaway
certificates (`Authority`), a TLS terminator in front of the plain Temporal dev server
(`running_terminator`), which also reads the gRPC requests' headers as they pass (`RequestTap`),
and an app served in-process with its lifespan (`served`).

The Temporal client is Rust (temporalio's core): nothing it sends can be observed inside this
process, so the headers are read off the wire, where the terminator sees them in clear. Neither
grpcio nor an HPACK package is a dependency of the project, so the few parts of HTTP/2 and HPACK
(RFC 9113, RFC 7541) a request's headers need are decoded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEADLINE = 30.0  # seconds for the app's lifespan to start or stop
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A certificate and its key, as PEM files."""

    common_name: str
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Authority:
    """A throwaway certificate authority that issues server and client certificates."""

    name: str
    directory: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @classmethod
    def create(cls, directory: Path, name: str) -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        authority = cls(name, directory, key, cert)
        authority.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return authority

    def issue(self, name: str, *, hosts: tuple[str, ...] = (), client: bool = False) -> Credentials:
        """A certificate for `hosts` (DNS names or IP addresses) to serve TLS, or with `client` one
        to present as a client; written as `<name>.pem` and `<name>-key.pem`."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(_name(name), self.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        cert = builder.sign(self.key, hashes.SHA256())
        credentials = Credentials(name, self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        credentials.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        credentials.key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return credentials


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def server_context(server: Credentials, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """The terminator's TLS: `server`'s certificate, ALPN `h2` (gRPC runs on HTTP/2 and its clients
    insist on it), and with `client_ca` mutual TLS: a client certificate that CA signed is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert_path, server.key_path)
    context.set_alpn_protocols(["h2"])
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


# -- HPACK (RFC 7541): what decoding a request's header block takes ---------------------------

# Appendix A: the static table, indexes 1 to 61.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)  # fmt: skip

# Appendix B: the bit length of each symbol's Huffman code (0-255, then EOS). The code is canonical
# (codes of one length are consecutive, in symbol order), so the lengths define the codes.
HUFFMAN_LENGTHS: tuple[int, ...] = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28,
    28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6,
    6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8,
    7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7,
    7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23,
    24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22,
    23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25,
    26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24,
    20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27,
    27, 27, 27, 26, 30,
)  # fmt: skip
EOS = 256


def _huffman_codes() -> dict[tuple[int, int], int]:
    """(bit length, code) -> symbol, assigned canonically from `HUFFMAN_LENGTHS`."""
    codes: dict[tuple[int, int], int] = {}
    code, length = 0, 0
    for symbol in sorted(range(len(HUFFMAN_LENGTHS)), key=lambda s: (HUFFMAN_LENGTHS[s], s)):
        code <<= HUFFMAN_LENGTHS[symbol] - length
        length = HUFFMAN_LENGTHS[symbol]
        codes[(length, code)] = symbol
        code += 1
    return codes


HUFFMAN_CODES = _huffman_codes()


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code, length = 0, 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, length = (code << 1) | ((byte >> shift) & 1), length + 1
            symbol = HUFFMAN_CODES.get((length, code))
            if symbol is None:
                continue
            if symbol == EOS:
                raise ValueError("HPACK: EOS inside a Huffman string")
            out.append(symbol)
            code, length = 0, 0
    if length > 7 or code != (1 << length) - 1:  # padding: the most significant bits of EOS
        raise ValueError("HPACK: bad Huffman padding")
    return bytes(out)


class HpackDecoder:
    """Decodes the header blocks of one connection's direction, in order (they share a table)."""

    def __init__(self) -> None:
        self._dynamic: list[tuple[str, str]] = []  # newest first
        self._max_size = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                headers.append(self._entry(index))
            elif first & 0x40:  # literal, added to the table
                name, value, pos = self._literal(block, pos, 6)
                headers.append((name, value))
                self._add(name, value)
            elif first & 0x20:  # table size update
                self._max_size, pos = _integer(block, pos, 5)
                self._evict()
            else:  # literal without indexing, or never indexed (sensitive values, such as keys)
                name, value, pos = self._literal(block, pos, 4)
                headers.append((name, value))
        return headers

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        if 0 <= index - len(STATIC_TABLE) - 1 < len(self._dynamic):
            return self._dynamic[index - len(STATIC_TABLE) - 1]
        raise ValueError(f"HPACK: no table entry {index}")

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return name, value, pos

    def _add(self, name: str, value: str) -> None:
        self._dynamic.insert(0, (name, value))
        self._evict()

    def _evict(self) -> None:
        while self._dynamic and sum(len(n) + len(v) + 32 for n, v in self._dynamic) > self._max_size:
            self._dynamic.pop()


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value, pos = data[pos] & mask, pos + 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        byte, pos = data[pos], pos + 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _string(data: bytes, pos: int) -> tuple[str, int]:
    huffman = bool(data[pos] & 0x80)
    length, pos = _integer(data, pos, 7)
    raw = data[pos : pos + length]
    return (huffman_decode(raw) if huffman else raw).decode("latin-1"), pos + length


# -- HTTP/2 (RFC 9113): the client's side of a connection -------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, CONTINUATION = 0x1, 0x9
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20


@dataclass(frozen=True)
class GrpcRequest:
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def method(self) -> str:
        """The gRPC method, e.g. `GetSystemInfo`, from `:path`."""
        return self.values(":path")[0].rsplit("/", 1)[-1]


@dataclass
class RequestTap:
    """Reads the requests off the bytes one client sends on one connection (the preface, then
    frames); everything but header blocks is skipped. A malformed stream stops the reading and is
    kept in `error`, for the test to see: the bytes are forwarded whatever this makes of them."""

    requests: list[GrpcRequest] = field(default_factory=list)
    error: Exception | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _block: bytearray = field(default_factory=bytearray)
    _decoder: HpackDecoder = field(default_factory=HpackDecoder)
    _preface_read: bool = False

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._buffer += data
        try:
            self._read_frames()
        except (ValueError, IndexError) as exc:
            self.error = exc

    def _read_frames(self) -> None:
        if not self._preface_read:
            if len(self._buffer) < len(PREFACE):
                return
            if bytes(self._buffer[: len(PREFACE)]) != PREFACE:
                raise ValueError("not an HTTP/2 client connection")
            del self._buffer[: len(PREFACE)]
            self._preface_read = True
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                return
            kind, flags = self._buffer[3], self._buffer[4]
            payload = bytes(self._buffer[9 : 9 + length])
            del self._buffer[: 9 + length]
            if kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY:
                    payload = payload[5:]
            elif kind != CONTINUATION:
                continue
            self._block += payload
            if flags & END_HEADERS:
                self.requests.append(GrpcRequest(tuple(self._decoder.decode(bytes(self._block)))))
                self._block.clear()


# -- the TLS terminator -----------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """One connection the terminator accepted (its TLS handshake, if any, succeeded)."""

    alpn: str | None
    client_common_name: str | None  # of the verified client certificate, under mutual TLS
    tap: RequestTap


@dataclass
class Terminator:
    port: int
    server_names: list[str | None] = field(default_factory=list)  # SNI of every TLS handshake begun
    accepted: list[Accepted] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[GrpcRequest]:
        return [request for connection in self.accepted for request in connection.tap.requests]

    @property
    def tap_errors(self) -> list[Exception]:
        return [c.tap.error for c in self.accepted if c.tap.error is not None]


@contextlib.asynccontextmanager
async def running_terminator(upstream: str, context: ssl.SSLContext | None) -> AsyncIterator[Terminator]:
    """A proxy on a free port of 127.0.0.1 that forwards every connection to `upstream`
    (`host:port`), terminating TLS with `context` (None: plain TCP, as cleartext gRPC), and reads
    the requests that pass. Every connection is closed when the block exits."""
    host, port = upstream.rsplit(":", 1)
    writers: set[asyncio.StreamWriter] = set()
    pipes: set[asyncio.Task[None]] = set()
    terminator = Terminator(port=0)
    if context is not None:
        context.sni_callback = lambda _sock, name, _context: terminator.server_names.append(name)

    async def accept(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        writers.add(client_writer)
        tls: ssl.SSLObject | None = client_writer.get_extra_info("ssl_object")
        peer = tls.getpeercert(binary_form=True) if tls is not None else None
        tap = RequestTap()
        alpn = tls.selected_alpn_protocol() if tls is not None else None
        terminator.accepted.append(Accepted(alpn, _common_name(peer) if peer else None, tap))
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        writers.add(server_writer)
        for task in (
            asyncio.create_task(_pipe(client_reader, server_writer, tap)),
            asyncio.create_task(_pipe(server_reader, client_writer, None)),
        ):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    terminator.port = server.sockets[0].getsockname()[1]
    try:
        yield terminator
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.gather(*pipes, return_exceptions=True)
        await server.wait_closed()


def _common_name(der: bytes) -> str:
    value = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value if isinstance(value, str) else value.decode()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: RequestTap | None) -> None:
    try:
        while data := await reader.read(65536):
            if tap is not None:
                tap.feed(data)
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # the other side went away (reset, TLS alert): the connection ends either way
    finally:
        writer.close()


# -- the app, served in-process ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(app: Any, base_url: str = "http://testserver/api/v1") -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the ASGI `app`, with the app's lifespan run around it as a server runs it:
    the backends connect at start and close at the end, and each request sees the lifespan state."""
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    lifespan = asyncio.create_task(app(scope, to_app.get, from_app.put))

    async def lifespan_step(step: str) -> None:
        await to_app.put({"type": f"lifespan.{step}"})
        async with asyncio.timeout(DEADLINE):
            message = await from_app.get()
        if message["type"] != f"lifespan.{step}.complete":
            raise RuntimeError(f"the app's lifespan {step} failed: {message.get('message')}")

    async def with_state(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    await lifespan_step("startup")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_state), base_url=base_url) as http:
            yield http
    finally:
        await lifespan_step("shutdown")
        await lifespan

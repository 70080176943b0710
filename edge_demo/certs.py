"""The demo's HTTPS certificates: a local CA made once per state folder, and a server
certificate from it for this machine's LAN addresses, host name and localhost.

A phone trusts the CA once (``/trust`` on the plain-HTTP page says how); every server
certificate after that (new addresses, renewal) is trusted without touching the phone. Keys
are EC P-256 (what iOS, Android and every browser accept), private key files are 0600. The
server certificate lives 397 days (under Apple's 398-day and 825-day limits) and is issued
again at start-up when the names change or 30 days before it expires. ``--tls-cert/--tls-key``
bring an operator's own pair instead (:func:`load_own`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from dermedge.files import write_bytes

from .errors import EdgeDemoError

CA_DAYS = 3650
SERVER_DAYS = 397
RENEW_DAYS = 30
INSTALL_HINT = ("HTTPS needs the `cryptography` package: pip install 'dermedge[demo]'"
                " (or pass --tls off)")


def default_state_dir() -> Path:
    """Where the server keeps its CA, certificates and compressed files (per user), unless
    ``--state-dir`` or ``EDGE_DEMO_STATE_DIR`` says otherwise."""
    if os.environ.get("EDGE_DEMO_STATE_DIR"):
        return Path(os.environ["EDGE_DEMO_STATE_DIR"])
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "dermedge" / "edge-demo"


def _x509():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as exc:
        raise EdgeDemoError(INSTALL_HINT) from exc
    return x509, hashes, serialization, ec


def _write(path: Path, data: bytes, private: bool) -> None:
    """Atomic write (temp file then rename); a private file is 0600 from its first byte."""
    write_bytes(path, data, mode=0o600 if private else 0o644)


@dataclass(frozen=True)
class Names:
    """What a server certificate must cover."""

    dns: tuple[str, ...]
    ips: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join((*self.dns, *self.ips))


def machine_names(host: str, extra: tuple[str, ...] = ()) -> Names:
    """localhost, this machine's host name (and ``<name>.local`` for mDNS), its LAN addresses,
    the loopback addresses, the ``--host`` address when it is a specific one, and ``extra``."""
    from .server import lan_addresses

    dns: list[str] = ["localhost"]
    ips: list[str] = ["127.0.0.1", "::1"]
    name = socket.gethostname().strip().lower().rstrip(".")
    if name and name != "localhost":
        dns.append(name)
        if "." not in name:
            dns.append(name + ".local")
    ips += lan_addresses()
    if host not in ("", "0.0.0.0", "::", "localhost"):
        ips.append(host)
    for item in extra:
        item = item.strip().lower().rstrip(".")
        try:
            ips.append(str(ipaddress.ip_address(item)))
        except ValueError:
            dns.append(item)
    return Names(tuple(dict.fromkeys(d for d in dns if d)), tuple(dict.fromkeys(ips)))


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and key to serve, and the local CA's certificate (None: own pair)."""

    cert: Path
    key: Path
    ca_cert: Path | None
    names: tuple[str, ...]
    not_after: dt.datetime
    issued: bool = False  # made at this start (new names or renewal)

    def context(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context for HTTP/1.1; ``EdgeDemoError`` naming the fix when the pair
    cannot be used."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            why = "the key does not belong to the certificate"
        else:
            why = f"OpenSSL: {reason}"
        raise EdgeDemoError(f"Cannot use the TLS certificate {cert} with the key {key} ({why})."
                            " Pass a matching PEM pair to --tls-cert/--tls-key.") from exc
    return ctx


class LocalCA:
    """The CA in ``<state>/tls``: created on first use, then reused (phones trust it once)."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "tls"
        self.cert_path = self.dir / "ca.crt"
        self.key_path = self.dir / "ca.key"

    def ensure(self):
        """Load the CA, or make it when the folder has none; returns (certificate, key)."""
        x509, hashes, serialization, ec = _x509()
        if self.cert_path.exists() or self.key_path.exists():
            return self._load()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir.parent, 0o700)
        except OSError as exc:
            raise EdgeDemoError(f"Cannot create the state folder {self.dir} ({exc.strerror})."
                                " Pass --state-dir with a folder this user can write.") from exc
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        host = socket.gethostname() or "this machine"
        name = x509.Name([
            x509.NameAttribute(x509.oid.NameOID.COMMON_NAME,
                               f"dermedge demo CA ({host}, {now:%Y-%m-%d})"),
            x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "dermedge edge-demo (local)"),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                # path length 0: this CA signs server certificates only, never another CA
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        _write(self.key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), private=True)
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        return cert, key

    def _load(self):
        x509, _, serialization, _ = _x509()
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise EdgeDemoError(
                f"The local CA in {self.dir} cannot be read ({exc}). Fix its permissions, or"
                f" delete {self.dir} to make a new CA (every phone must then trust the new"
                " one), or pass another --state-dir.") from exc
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise EdgeDemoError(f"{self.key_path} is not the key of {self.cert_path}. Delete"
                                f" {self.dir} to make a new CA, or pass another --state-dir.")
        if os.name == "posix" and self.key_path.stat().st_mode & 0o077:
            os.chmod(self.key_path, 0o600)  # a key readable by others is tightened, not used so
        return cert, key

    def server_files(self, names: Names, now: dt.datetime | None = None) -> TlsFiles:
        """The server certificate for ``names``: reused when it is this CA's, covers every
        name and has more than 30 days left; else issued anew."""
        x509, hashes, serialization, ec = _x509()
        ca_cert, ca_key = self.ensure()
        now = now or dt.datetime.now(dt.UTC)
        cert_path, key_path = self.dir / "server.crt", self.dir / "server.key"
        current = _read_cert(cert_path) if key_path.exists() else None
        if current is not None and _covers(current, ca_cert, names, now):
            return TlsFiles(cert_path, key_path, self.cert_path, _san_names(current),
                            current.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(d) for d in names.dns] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in names.ips]
        cn = next((d for d in names.dns if d != "localhost"), "localhost")
        not_after = min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_encipherment=False, content_commitment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        return TlsFiles(cert_path, key_path, self.cert_path, _san_names(cert), not_after,
                        issued=True)


def _read_cert(path: Path):
    x509 = _x509()[0]
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None  # unreadable or damaged: issue a new one


def _san_names(cert) -> tuple[str, ...]:
    x509 = _x509()[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (*san.get_values_for_type(x509.DNSName),
            *(str(a) for a in san.get_values_for_type(x509.IPAddress)))


def _covers(cert, ca_cert, names: Names, now: dt.datetime) -> bool:
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - InvalidSignature, another key type: issue anew
        return False
    have = set(_san_names(cert))
    return (set(names.dns) | set(names.ips)) <= have and (
        cert.not_valid_after_utc - now > dt.timedelta(days=RENEW_DAYS))


def load_own(cert: str | Path, key: str | Path, now: dt.datetime | None = None) -> TlsFiles:
    """An operator's certificate and key (``--tls-cert/--tls-key``), checked: readable PEM,
    matching, and valid today."""
    x509 = _x509()[0]
    cert, key = Path(cert), Path(key)
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise EdgeDemoError(f"{flag} {path}: no such file. Pass the PEM file of your"
                                " certificate (--tls-cert) and its private key (--tls-key).")
        try:
            path.read_bytes()
        except OSError as exc:
            raise EdgeDemoError(f"{flag} {path} cannot be read ({exc.strerror}). Check its"
                                " permissions.") from exc
    try:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError as exc:
        raise EdgeDemoError(f"--tls-cert {cert} is not a PEM certificate ({exc}). Pass the"
                            " certificate (chain) in PEM, '-----BEGIN CERTIFICATE-----'."
                            ) from exc
    now = now or dt.datetime.now(dt.UTC)
    if parsed.not_valid_after_utc <= now:
        raise EdgeDemoError(f"--tls-cert {cert} expired on {parsed.not_valid_after_utc:%Y-%m-%d}"
                            ". Renew it, or leave out --tls-cert/--tls-key to use the local CA.")
    if parsed.not_valid_before_utc > now:
        raise EdgeDemoError(f"--tls-cert {cert} is not valid before"
                            f" {parsed.not_valid_before_utc:%Y-%m-%d %H:%M} UTC. Check this"
                            " machine's clock.")
    serialization = _x509()[2]
    try:
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    except TypeError as exc:  # "Password was not given but private key is encrypted"
        raise EdgeDemoError(f"--tls-key {key} is encrypted with a passphrase; the server starts"
                            " unattended, so give it an unencrypted key (e.g. `openssl pkey"
                            " -in KEY -out plain.key`) and keep that file private.") from exc
    except ValueError as exc:
        raise EdgeDemoError(f"--tls-key {key} is not a PEM private key ({exc}). Pass the key"
                            " of --tls-cert in PEM, '-----BEGIN PRIVATE KEY-----'.") from exc
    server_context(cert, key)  # the key belongs to the certificate
    return TlsFiles(cert, key, None, _san_names(parsed), parsed.not_valid_after_utc)


def der(pem_path: Path) -> bytes:
    """A PEM certificate in DER, the form phones' certificate installers take."""
    x509, _, serialization, _ = _x509()
    cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def common_name(pem_path: Path) -> str:
    """The certificate's subject common name (how a phone lists the CA)."""
    x509 = _x509()[0]
    cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def fingerprint(pem_path: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, as phones show it (AA:BB:...)."""
    x509, hashes, _, _ = _x509()
    cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()

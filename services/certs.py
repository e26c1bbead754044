"""A development certificate authority and service certificates: `stt certs DIR` / `make certs`.

    ca.pem, ca.key                     the CA (keep ca.key to yourself; clients trust ca.pem)
    gateway.pem/.key                   server + client certificates, one per service, each naming
    transcriber.pem/.key               the service (its SAN and CN), localhost, 127.0.0.1 and ::1,
    jobstore.pem/.key                  and the Kubernetes Service names of the dev overlay
    client.pem/.key                    a client certificate for the SDK/CLI (--tls-cert/--tls-key)

For development and tests. Production certificates come from cert-manager (the `tls` kustomize
component) or your own PKI; the services reload them when the files change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("gateway", "transcriber", "jobstore")
# Names the services have inside the dev/prod namespaces (Service names, headless included).
K8S_NAMES = {
    "gateway": ["gateway"],
    "transcriber": ["transcriber", "transcriber-headless"],
    "jobstore": ["jobstore"],
}
NAMESPACES = ("stt", "stt-dev")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stt dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if not (cert_path.exists() and key_path.exists()):
        return None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def make_ca(out: Path, days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("stt development CA"))
        .issuer_name(_name("stt development CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue(
    out: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    dns: list[str] | None = None,
    ips: list[str] | None = None,
    days: int = 825,
    server: bool = True,
) -> Path:
    """`name`.pem/.key signed by the CA, usable as server and client certificate."""
    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys([name, *(dns or [])])]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in (ips or [])]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / f"{name}.key", _pem_key(key), private=True)
    _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.pem"


def make_dev_pki(out: str | Path, *, force: bool = False, days: int = 825) -> Path:
    """The CA (kept if it exists, unless force) and a certificate per service plus `client`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca = None if force else _load_ca(out)
    if ca is None:
        ca = make_ca(out)
    local_dns, local_ips = ["localhost"], ["127.0.0.1", "::1"]
    for service in SERVICES:
        k8s = [
            f"{n}.{ns}{suffix}"
            for n in K8S_NAMES[service]
            for ns in NAMESPACES
            for suffix in ("", ".svc", ".svc.cluster.local")
        ]
        issue(out, service, ca, dns=[*K8S_NAMES[service], *k8s, *local_dns], ips=local_ips, days=days)
    issue(out, "client", ca, days=days, server=False)
    return out


def cli(args: argparse.Namespace) -> int:
    """`stt certs DIR` (the SDK's CLI finds this through the `stt.server` entry point)."""
    out = make_dev_pki(args.dir, force=args.force, days=args.days)
    print(f"development CA and certificates in {out}/")
    print("  servers: STT_TLS_CERT_FILE=<svc>.pem STT_TLS_KEY_FILE=<svc>.key STT_TLS_CLIENT_CA_FILE=ca.pem")
    print(f"  clients: stt --tls-ca {out}/ca.pem [--tls-cert {out}/client.pem --tls-key {out}/client.key]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.certs", description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", default="certs")
    parser.add_argument("--force", action="store_true", help="make a new CA even if DIR has one")
    parser.add_argument("--days", type=int, default=825, help="validity of the service certificates")
    return cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

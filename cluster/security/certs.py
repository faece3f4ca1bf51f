"""X.509 material for the project's TLS links, built with `cryptography` (no openssl CLI needed).

Two uses:
- a provider's stage host makes a self-signed certificate at start (`self_signed`); its PEM travels in
  the provider's signed registration, and the operator's coordinator pins exactly that certificate;
- the operator's Ray cluster, where it spans machines, runs with `RAY_USE_TLS=1` and a CA that
  `solanalm` creates (`create_ca`, then `issue` one certificate per node).

Keys are ECDSA P-256 (fast handshakes, supported by gRPC/BoringSSL and Python's ssl alike).
"""

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 365


@dataclass(frozen=True, slots=True)
class CertKey:
    """A certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER encoding, hex (what a registration pins)."""
        return fingerprint(self.cert_pem)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files; the key readable by its owner only."""
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 hex of a PEM certificate's DER bytes; ValueError when it is not a certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def self_signed(hosts: list[str], common_name: str = "solanalm-stage-host", days: int = DEFAULT_DAYS) -> CertKey:
    """A self-signed server certificate for `hosts` (DNS names or IP addresses), valid from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _base(name, name, key.public_key(), days).add_extension(_san(hosts), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    return CertKey(_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def create_ca(common_name: str = "solanalm-cluster-ca", days: int = 10 * DEFAULT_DAYS) -> CertKey:
    """A certificate authority for one operator cluster (Ray's TLS between its nodes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _base(name, name, key.public_key(), days)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(
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
    return CertKey(_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def issue(ca: CertKey, hosts: list[str], common_name: str = "solanalm-node", days: int = DEFAULT_DAYS) -> CertKey:
    """A node certificate for `hosts`, signed by `ca`; usable as server and client (Ray's TLS is mutual)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _base(subject, ca_cert.subject, key.public_key(), days).add_extension(_san(hosts), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    return CertKey(_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def _base(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("a certificate needs at least one host name or address")
    return x509.SubjectAlternativeName(names)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

"""Ray's mutual TLS for the operator cluster: the CA and node certificates `solanalm tls init` writes, and
the environment that turns TLS on for a head and its drivers.

Ray reads `RAY_USE_TLS=1`, `RAY_TLS_SERVER_CERT`, `RAY_TLS_SERVER_KEY` and `RAY_TLS_CA_CERT` in every
process; the connection is mutual (each side shows a certificate signed by the CA) and the client checks
the server's name, so a node certificate must name every address it is reached at (`--host`).
"""

import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from cluster.config.serving import RaySection
from cluster.security.certs import CertKey, create_ca, issue

USE_TLS_ENV = "RAY_USE_TLS"
CERT_ENV = "RAY_TLS_SERVER_CERT"
KEY_ENV = "RAY_TLS_SERVER_KEY"
CA_ENV = "RAY_TLS_CA_CERT"
TLS_DIRNAME = "tls"


class RayTlsError(RuntimeError):
    """TLS is on but its files are missing; the message says what to run."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where one node's TLS material lies."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    @classmethod
    def under(cls, directory: Path, name: str = "node") -> "TlsFiles":
        return cls(directory / "ca.crt", directory / "ca.key", directory / f"{name}.crt", directory / f"{name}.key")

    def env(self) -> dict[str, str]:
        """The variables that turn Ray's TLS on with these files."""
        return {USE_TLS_ENV: "1", CERT_ENV: str(self.cert), KEY_ENV: str(self.key), CA_ENV: str(self.ca_cert)}


def tls_dir(section: RaySection, state_dir: Path) -> Path:
    """The `ray.tls_dir` setting, else <state dir>/tls."""
    return (section.tls_dir or state_dir / TLS_DIRNAME).expanduser()


def default_hosts() -> list[str]:
    """Names a node certificate covers without --host: loopback, this machine's host name and the address
    Ray advertises for it (the one its outbound route uses)."""
    hosts = ["localhost", "127.0.0.1", socket.gethostname()]
    ip = _outbound_ip()
    return list(dict.fromkeys([*hosts, ip] if ip else hosts))


def _outbound_ip() -> str | None:
    # Ray picks a node's IP the same way: the local end of a UDP "connection" (no packet is sent).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("8.8.8.8", 80))
            return str(sock.getsockname()[0])
        except OSError:
            return None


def init_tls(directory: Path, hosts: list[str], name: str = "node", new_ca: bool = False) -> TlsFiles:
    """Write a CA (kept when one exists, unless `new_ca`) and a node certificate for `hosts` signed by it.

    Keys are written 0600 and the directory 0700; run again with another `name` and that node's
    addresses to issue each further node its own certificate from the same CA."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    files = TlsFiles.under(directory, name)
    if new_ca or not (files.ca_cert.exists() and files.ca_key.exists()):
        ca = create_ca()
        ca.write(files.ca_cert, files.ca_key)
    else:
        ca = CertKey(files.ca_cert.read_bytes(), files.ca_key.read_bytes())
    issue(ca, hosts, common_name=f"solanalm-{name}").write(files.cert, files.key)
    return files


def tls_env(section: RaySection, state_dir: Path) -> dict[str, str]:
    """Variables for a head and its drivers: {} unless `ray.tls`; RayTlsError when the files are missing."""
    if not section.tls:
        return {}
    files = TlsFiles.under(tls_dir(section, state_dir))
    missing = [str(p) for p in (files.ca_cert, files.cert, files.key) if not p.is_file()]
    if missing:
        raise RayTlsError(f"ray.tls is on but {', '.join(missing)} is missing; run `solanalm tls init`")
    return files.env()


def certificate_hosts(cert_path: Path) -> list[str]:
    """The DNS names and addresses a certificate file is valid for (what `solanalm tls init` reports)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.IPAddress)]

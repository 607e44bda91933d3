"""Certificates and keys of a bed's control plane, made with the openssl CLI.

Why openssl and not the `cryptography` package: the project venv does not carry `cryptography`,
and openssl is on every Debian machine. Everything is throwaway: a CA, the API server's serving
cert (for 127.0.0.1), the service-account key pair and an admin client cert in system:masters,
which the controller-manager, the scheduler, the harness and kubectl all use.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# The API server's Service IP is the first address of --service-cluster-ip-range (control_plane.py).
SERVICE_IP = "10.0.0.1"
# P-256 everywhere (service-account tokens then sign with ES256): RSA key generation costs seconds
# on a loaded 2-core machine, EC keys a few milliseconds.
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


@dataclass(frozen=True)
class Certs:
    ca: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path
    admin_cert: Path
    admin_key: Path


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _signed(directory: Path, name: str, subject: str, ca: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, crt, ext = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".crt", ".ext"))
    _openssl("req", "-new", *EC_KEY, "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject)
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(crt), "-days", "30", "-sha256", "-extfile", str(ext))
    return crt, key


def make_certs(directory: Path) -> Certs:
    """Write a fresh set of keys and certificates into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", str(ca_key), "-out", str(ca),
             "-days", "30", "-sha256", "-subj", "/CN=pipeshift-bed-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sans = ",".join(["IP:127.0.0.1", f"IP:{SERVICE_IP}", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
                     "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"])
    serving_cert, serving_key = _signed(
        directory, "apiserver", "/CN=kube-apiserver", ca, ca_key,
        f"subjectAltName={sans}\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    admin_cert, admin_key = _signed(
        directory, "admin", "/O=system:masters/CN=pipeshift-bed-admin", ca, ca_key,
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    sa_key, sa_pub = directory / "sa.key", directory / "sa.pub"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(sa_key))
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub))
    return Certs(ca, ca_key, serving_cert, serving_key, sa_key, sa_pub, admin_cert, admin_key)

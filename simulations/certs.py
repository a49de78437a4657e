"""`fedrex certs`: the files a secure deployment needs, made with the `cryptography` package.

    fedrex certs --out certs --supernodes 3 [--host 192.168.1.10]

writes
- ``ca.crt`` / ``ca.key``: a private certificate authority (keep ca.key off the devices);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  localhost, 127.0.0.1 and every ``--host``;
- ``supernode-<i>`` / ``supernode-<i>.pub``: one ECDSA P-384 key pair per SuperNode in OpenSSH
  format (the SuperNode keeps the private key; the public key is registered with
  ``flwr supernode register``; a SuperNode whose key is not registered is refused).

Flower's own flags then do the rest (README, "Secure deployment").
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from models.errors import FedrexError


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def make_certificates(out: Path, supernodes: int, hosts: list[str] | None = None, days: int = 365) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if supernodes < 0:
        raise FedrexError(f"--supernodes must be >= 0, got {supernodes}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM

    def key_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedREX deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "ca.key", key_pem(ca_key), private=True)

    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts or []:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedREX SuperLink")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    _write(out / "server.pem", server.public_bytes(pem))
    _write(out / "server.key", key_pem(server_key), private=True)

    for i in range(supernodes):
        node_key = ec.generate_private_key(ec.SECP384R1())
        _write(out / f"supernode-{i}", node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                              serialization.NoEncryption()), private=True)
        _write(out / f"supernode-{i}.pub", node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return {"ca": out / "ca.crt", "server_cert": out / "server.pem", "server_key": out / "server.key",
            "supernode_keys": [out / f"supernode-{i}" for i in range(supernodes)]}


def certs_cmd(args) -> int:
    made = make_certificates(Path(args.out), args.supernodes, args.host)
    print(f"wrote {made['ca']}, {made['server_cert']}, {made['server_key']} and {len(made['supernode_keys'])} "
          f"SuperNode key pairs to {args.out}")
    return 0

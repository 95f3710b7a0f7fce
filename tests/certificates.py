"""Certificates for the parties' TLS links, made here as `openssl` would (docs/deployment.md): a CA, a certificate
per identity signed by it, and the bad ones a party must refuse (expired, self-signed, from another CA)."""
import datetime
from pathlib import Path
from typing import Dict, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, name: str, key, certificate) -> Tuple[str, str]:
    cert_path, key_path = folder / f'{name}.crt', folder / f'{name}.key'
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool = False, expired: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(folder: Path, names=('owner', 'client', 'dealer', 'stranger')) -> Dict[str, Dict[str, str]]:
    """``folder``'s CA (``ca.crt``) and, per name, ``{'cert', 'key', 'ca'}`` paths of a certificate for that identity;
    also ``expired`` (the CA's, past its end), ``self-signed`` and ``other-ca`` (signed by a CA the parties do not
    trust), each for the identity ``client``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, _ = _write(folder, 'ca', ca_key, _certificate('timm-mpc test CA', ca_key, 'timm-mpc test CA', ca_key, ca=True))
    other_key = ec.generate_private_key(ec.SECP256R1())
    made = {}

    def leaf(label, identity, issuer, issuer_key, **kwargs):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(identity, key, issuer, issuer_key if issuer_key is not None else key, **kwargs)
        cert_path, key_path = _write(folder, label, key, cert)
        made[label] = dict(cert=cert_path, key=key_path, ca=ca_cert)
    for name in names:
        leaf(name, name, 'timm-mpc test CA', ca_key)
    leaf('expired', 'client', 'timm-mpc test CA', ca_key, expired=True)
    leaf('self-signed', 'client', 'client', None)
    leaf('other-ca', 'client', 'another CA', other_key)
    return made

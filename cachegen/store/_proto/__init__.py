"""Generated gRPC code of ``proto/cachegen/kvstore/v1/kvstore.proto``, (re)generated on import when missing or stale.

The generated ``kvstore_pb2*.py`` files are not committed (see .gitignore). Importing this package runs protoc
(from grpcio-tools, in-process) when a generated file is absent or was generated from another version of the
.proto, which keeps a fresh clone, an editable install and an edited .proto working without a build step. The
files are written to a temp dir and renamed into place, so concurrent importers never see half a file. Only
``cachegen/store/wire.py`` imports this package.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_PROTO_ROOT = _HERE.parents[2] / "proto"
_PROTO_NAME = "cachegen/kvstore/v1/kvstore.proto"
_STAMP = "# cachegen-proto-sha256: "
_OUTPUTS = ("kvstore_pb2.py", "kvstore_pb2_grpc.py")


def _proto_digest() -> str | None:
    source = _PROTO_ROOT / _PROTO_NAME
    return hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else None


def _is_current(digest: str | None) -> bool:
    generated = _HERE / "kvstore_pb2.py"
    if not generated.exists() or not (_HERE / "kvstore_pb2_grpc.py").exists():
        return False
    if digest is None:
        return True  # an installed copy without the .proto: use what was generated at build time
    with open(generated, encoding="utf-8") as file:
        return file.readline().strip() == (_STAMP + digest).strip()


def _run_protoc(out_dir: Path) -> None:
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{_PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        _PROTO_NAME,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {_PROTO_ROOT / _PROTO_NAME}")


def _generate(digest: str) -> None:
    with tempfile.TemporaryDirectory(prefix=".protoc-", dir=_HERE) as tmp:
        out_dir = Path(tmp)
        _run_protoc(out_dir)
        generated = out_dir / Path(_PROTO_NAME).parent
        for name in _OUTPUTS:
            text = (generated / name).read_text(encoding="utf-8")
            # protoc names the sibling module by its proto package path; here it lives next door.
            text = text.replace("from cachegen.kvstore.v1 import kvstore_pb2", "from . import kvstore_pb2")
            if name == "kvstore_pb2.py":
                text = f"{_STAMP}{digest}\n{text}"
            staged = out_dir / name
            staged.write_text(text, encoding="utf-8")
        # pb2 before pb2_grpc: the grpc module imports the pb2 module, never the other way round.
        for name in _OUTPUTS:
            os.replace(out_dir / name, _HERE / name)
    log.info("generated gRPC code from %s into %s", _PROTO_NAME, _HERE)


def ensure_generated() -> None:
    """Generate the gRPC modules unless they exist and match the .proto source."""
    digest = _proto_digest()
    if not _is_current(digest):
        if digest is None:
            raise RuntimeError(f"no generated gRPC code in {_HERE} and no {_PROTO_NAME} under {_PROTO_ROOT}")
        _generate(digest)


ensure_generated()

from cachegen.store._proto import kvstore_pb2, kvstore_pb2_grpc

__all__ = ["kvstore_pb2", "kvstore_pb2_grpc"]

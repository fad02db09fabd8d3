"""Where the tests find xds-protos (Envoy's official generated code) for the wire-compatibility peers.

xds-protos ships its own copies of third-party protos (opentelemetry among them) that would shadow
the real packages if installed into the venv's site-packages, so it lives in a directory of its own
(``make`` installs it to ``.venv/xds-protos``) and only the peer subprocesses put it on their path.
It also registers the same protobuf names as our generated code, so it never shares a process with
it anyway.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

XDS_PROTOS_DIR = Path(sys.prefix) / "xds-protos"


def peer_env() -> dict[str, str]:
    """The environment of a subprocess that imports xds-protos' ``envoy.*`` modules."""
    if not (XDS_PROTOS_DIR / "envoy").is_dir():
        XDS_PROTOS_DIR.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{XDS_PROTOS_DIR}.lock", "w") as lock:  # xdist workers may race here
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (XDS_PROTOS_DIR / "envoy").is_dir():
                subprocess.run(
                    [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                     "--target", str(XDS_PROTOS_DIR), "xds-protos>=1.60"],
                    check=True,
                )  # fmt: skip
    return {**os.environ, "PYTHONPATH": str(XDS_PROTOS_DIR)}

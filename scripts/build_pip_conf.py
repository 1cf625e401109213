"""Writes the pip.conf an image build uses: this machine's local wheel folders and package indexes (from pip's
own configuration) served on loopback, plus a `# cert = PATH` line naming the CA bundle pip trusts here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

OPTION = re.compile(r"^[^=]*\.(find-links|extra-index-url|cert)='(.*)'$")


def pip_options() -> dict[str, list[str]]:
    """`pip config list` (files and PIP_* variables), the values of the options a build needs."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    options: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        match = OPTION.match(line.strip())
        if match:
            for value in match.group(2).split():
                if value not in options.setdefault(match.group(1), []):
                    options[match.group(1)].append(value)
    return options


def local_folder(url: str) -> Path | None:
    path = Path(url.removeprefix("file://"))
    return path if path.is_absolute() and path.is_dir() else None


def pip_conf(served: Path, port: int, options: dict[str, list[str]]) -> str:
    """The pip.conf text; links each local folder into `served` (what the loopback server shares)."""
    lines = ["[global]", "trusted-host = 127.0.0.1"]
    count = 0
    for option in ("find-links", "extra-index-url"):
        urls = []
        for url in options.get(option, []):
            folder = local_folder(url)
            if folder is None:
                if url.startswith(("http://", "https://")):
                    urls.append(url)
                continue
            count += 1
            if option == "find-links":
                os.symlink(folder, served / str(count))
                urls.append(f"http://127.0.0.1:{port}/{count}/")
            else:  # an index's pages link its files relatively (../../files/...): share its parent folder
                os.symlink(folder.parent, served / str(count))
                urls.append(f"http://127.0.0.1:{port}/{count}/{folder.name}/")
        if urls:
            lines.append(f"{option} = {' '.join(urls)}")
    cert = os.environ.get("PIP_CERT") or next(iter(options.get("cert", [])), "")
    if not cert and Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        cert = "/etc/ssl/certs/ca-certificates.crt"
    lines.append(f"# cert = {cert}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: build_pip_conf.py SERVED_DIR PORT", file=sys.stderr)
        return 2
    sys.stdout.write(pip_conf(Path(argv[0]), int(argv[1]), pip_options()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

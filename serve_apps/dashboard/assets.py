"""The dashboard's vendored front-end files: check them against static/vendor/manifest.json, re-fetch any
missing or changed one from the npm registry (`npm pack NAME@VERSION`). `make install` runs this: it is the
front end's build step (there is nothing to compile: htmx and uPlot ship minified files).

    python -m serve_apps.dashboard.assets           # check; fetch what is missing or wrong (needs npm)
    python -m serve_apps.dashboard.assets --check   # check only; exit 1 on any mismatch
"""

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)
VENDOR_DIR = Path(__file__).parent / "static" / "vendor"
MANIFEST = VENDOR_DIR / "manifest.json"


@dataclass(frozen=True, slots=True)
class VendoredFile:
    """One file of an npm package, pinned by version and sha256."""

    file: str
    package: str
    version: str
    path: str  # inside the package tarball
    sha256: str


class AssetError(RuntimeError):
    """A vendored file is missing or differs from its manifest entry and could not be fetched."""


def read_manifest(path: Path = MANIFEST) -> list[VendoredFile]:
    entries = json.loads(path.read_text())["files"]
    return [VendoredFile(e["file"], e["package"], e["version"], e["path"], e["sha256"]) for e in entries]


def sha256_of(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def stale(entries: list[VendoredFile], vendor_dir: Path = VENDOR_DIR) -> list[VendoredFile]:
    """The entries whose file is missing or has another sha256."""
    return [e for e in entries if sha256_of(vendor_dir / e.file) != e.sha256]


def fetch(entry: VendoredFile, vendor_dir: Path = VENDOR_DIR) -> None:
    """`npm pack` the pinned package, extract the file, check its sha256, then put it in place."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run(
                ["npm", "pack", f"{entry.package}@{entry.version}", "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise AssetError(f"cannot fetch {entry.package}@{entry.version} with npm: {exc}") from exc
        tarball = Path(tmp) / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tar:
            member = tar.extractfile(entry.path)
            if member is None:
                raise AssetError(f"{entry.package}@{entry.version} has no {entry.path}")
            data = member.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise AssetError(f"{entry.package}@{entry.version}:{entry.path} has sha256 {digest}, manifest {entry.sha256}")
    (vendor_dir / entry.file).write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a file is missing or differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wrong = stale(read_manifest())
    if not wrong:
        logger.info("dashboard assets: %d files match manifest.json", len(read_manifest()))
        return 0
    if args.check:
        logger.error("dashboard assets missing or changed: %s", ", ".join(e.file for e in wrong))
        return 1
    try:
        for entry in wrong:
            logger.info("fetching %s from %s@%s", entry.file, entry.package, entry.version)
            fetch(entry)
    except AssetError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

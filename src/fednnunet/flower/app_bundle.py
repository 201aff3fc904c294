"""The Flower App (FAB) that fednnunet submits, and the check that a run carries exactly that app.

A FAB built from the same files is the same bytes (Flower's build fixes every zip entry's date), so a site can
build the FAB of its own installed version and compare: ``flwr run`` of any other app, or of another fednnunet
version, has another hash. Where two machines' zlib compress the same files differently (the hash then differs
although the app is the same), the FAB's unpacked files are compared instead; the FAB is read as data only.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

#: The packaged Flower App definitions ``flwr run`` can submit: (package, resource path) by folder name.
FLOWER_APPS = {"flower_app": ("fednnunet.flower", "app/pyproject.toml"),
               "echo_app": ("fednnunet.bench", "echo_app/pyproject.toml")}  # bench flower-floor
#: The FAB id (publisher/name) of the federation's app, as Flower reports it for a run.
APP_ID = "fednnunet/fednnunet-app"
#: Largest FAB the check unpacks (ours is a few hundred bytes; a larger one is refused unread).
MAX_FAB_BYTES = 1 << 20


def app_dir(workdir: Path, name: str = "flower_app") -> Path:
    """A copy of a packaged Flower App definition (:data:`FLOWER_APPS`) that ``flwr run`` can build a FAB from."""
    package, resource = FLOWER_APPS[name]
    target = Path(workdir) / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "pyproject.toml").write_text(resources.files(package).joinpath(resource).read_text())
    return target


@dataclass(frozen=True)
class ExpectedApp:
    """What this installed version submits: FAB id, version, hash and unpacked files."""

    fab_id: str
    version: str
    fab_hash: str
    files: dict[str, bytes]

    def describe(self) -> str:
        return f"{self.fab_id} {self.version} (FAB sha256 {self.fab_hash[:12]})"


@lru_cache(maxsize=1)
def expected_app() -> ExpectedApp:
    """Build this version's FAB exactly as ``flwr run`` does (Flower's own builder) and describe it."""
    import tomllib

    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory() as tmp:
        folder = app_dir(Path(tmp))
        fab = build_fab_from_disk(folder)
        project = tomllib.loads((folder / "pyproject.toml").read_text())
    publisher = project["tool"]["flwr"]["app"]["publisher"]
    app_id = f"{publisher}/{project['project']['name']}"
    if app_id != APP_ID:
        raise RuntimeError(f"the packaged app is {app_id}, expected {APP_ID}")
    return ExpectedApp(app_id, project["project"]["version"], hashlib.sha256(fab).hexdigest(), _unpack(fab))


def _unpack(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def refusal(fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes | None) -> str | None:
    """Why a run with this app must not be served here, or None when it is exactly this version's app."""
    expected = expected_app()
    theirs = f"{fab_id or '?'} {fab_version or '?'} (FAB sha256 {(fab_hash or '?')[:12]})"
    if fab_id != expected.fab_id or fab_version != expected.version:
        return f"the run's app is {theirs}, not {expected.describe()}"
    if fab_hash == expected.fab_hash:
        return None
    if fab_content is None or len(fab_content) > MAX_FAB_BYTES:
        return f"the run's app {theirs} is not the FAB of {expected.describe()}"
    try:
        same = _unpack(fab_content) == expected.files
    except (zipfile.BadZipFile, ValueError, OSError):
        same = False
    return None if same else f"the run's app {theirs} differs from {expected.describe()}"

"""A hostile Flower app for the isolation tests: wherever any of its code runs, it leaves a marker file.

Its ServerApp marks, then messages every node it can see and records the errors it gets back; its ClientApp marks
and answers. A run of it that is refused everywhere leaves no marker at all.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

_MODULE = '''
import os
import socket

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKERS = {markers!r}


def mark(who: str) -> None:
    os.makedirs(MARKERS, exist_ok=True)
    with open(os.path.join(MARKERS, f"{{who}}-{{socket.gethostname()}}-{{os.getpid()}}"), "w") as f:
        f.write("hostile code ran here")


server = ServerApp()
client = ClientApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    mark("clientapp")
    return Message(RecordDict({{"loot": ConfigRecord({{"node_config": str(dict(context.node_config))}})}}),
                   reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    mark("serverapp")
    messages = [Message(RecordDict({{"x": ConfigRecord({{"a": 1}})}}), dst_node_id=node, message_type="query")
                for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=120))
    with open(os.path.join(MARKERS, "serverapp-saw.txt"), "w") as f:
        for reply in replies:
            f.write((reply.error.reason if reply.has_error() else "answered") + "\\n")
'''

_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hostile"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "hostile_app:server"
clientapp = "hostile_app:client"

[tool.flwr.app.config]
'''


def write_hostile_app(folder: Path, markers: Path) -> Path:
    """The app's folder (what ``flwr run`` takes); its code marks files in ``markers``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(textwrap.dedent(_PYPROJECT).lstrip())
    (folder / "hostile_app.py").write_text(_MODULE.format(markers=str(markers)).lstrip())
    return folder


def markers_found(markers: Path) -> list[str]:
    """Files the hostile code left (none when it never ran)."""
    return sorted(p.name for p in markers.glob("*")) if markers.is_dir() else []


def flwr_home(folder: Path, address: str, root_certificates: Path | None) -> Path:
    """A FLWR_HOME whose default connection is ``address`` (what an attacker writes for the stock ``flwr``)."""
    folder.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (folder / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
                                        f'address = "{address}"\n{security}\n')
    return folder

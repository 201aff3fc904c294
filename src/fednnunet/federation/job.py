"""The description of one federation job, shared by the CLI (which writes it) and the ServerApp (which runs it).

One dataclass, serialised as JSON: the CLI maps its flags onto it, ``flwr run --run-config job-file=...`` points
the ServerApp at it, so there is exactly one way each option reaches the server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("extract_fingerprint", "plan_and_preprocess", "train", "find_best_configuration")


@dataclass
class JobSpec:
    task: str
    num_sites: int
    out_dir: str
    asym: bool = False
    configurations: list[str] = field(default_factory=list)
    planner: str = "ExperimentPlanner"
    gpu_memory_target_gb: dict[str, float] = field(default_factory=dict)
    num_processes: int = 1
    check_cases: bool = True
    connect_timeout_s: float = 300.0
    #: node id (as a string: JSON keys) -> site name, for the site keys the coordinator registered: a reply is
    #: attributed to the site of the node that sent it, never to the name the site gives itself
    site_nodes: dict[str, str] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    #: find_best_configuration's options (``cross_validation.coordinator.BestConfigurationOptions``)
    best_configuration: dict[str, Any] = field(default_factory=dict)
    #: end with ``job_done`` to every site, so that sites started for one job (``fednnunet client TASK``) exit;
    #: a one-machine federation stops its own sites and skips this round trip (``LocalFederation.run``)
    release_sites: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.num_sites < 1:
            raise ValueError("a federation needs at least one site")

    def save(self, path: Path) -> None:
        from fednnunet.atomic_files import write_json_atomic

        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "JobSpec":
        return cls(**json.loads(Path(path).read_text()))

"""Command line entry point (filled in per stage)."""


def main() -> None:
    raise SystemExit("fednnunet: no commands yet")

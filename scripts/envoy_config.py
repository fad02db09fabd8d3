"""Render envoy/envoy.tmpl.yaml into a runnable Envoy config.

The template has ``${NAME}`` placeholders for what differs between the demo (fixed loopback ports),
tests/e2e (ports chosen at run time) and docker-compose (service names as hosts); ``EnvoyParams``
holds them. The Lua source of envoy/identity.lua is inlined, so a rendered config is one
self-contained file. A multi-line value is indented to the column of its placeholder, which keeps
it inside the YAML block scalar the template puts it in.

    python scripts/envoy_config.py                  # the demo's config on stdout
    python scripts/envoy_config.py --write-compose  # regenerate envoy/envoy-compose.yaml
    python scripts/envoy_config.py --check-compose  # exit 1 when that file is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVOY_DIR = ROOT / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.tmpl.yaml"
IDENTITY_LUA = ENVOY_DIR / "identity.lua"
COMPOSE_CONFIG = ENVOY_DIR / "envoy-compose.yaml"

_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


@dataclass(frozen=True, slots=True)
class EnvoyParams:
    """The template's placeholders; defaults are the demo's (everything on loopback)."""

    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    ratelimit_host: str = "127.0.0.1"
    ratelimit_port: int = 8081
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 8000
    failure_mode_deny: bool = False

    def values(self) -> dict[str, str]:
        values = {f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values["FAILURE_MODE_DENY"] = "true" if self.failure_mode_deny else "false"
        values["IDENTITY_LUA"] = IDENTITY_LUA.read_text(encoding="utf-8").rstrip("\n")
        return values


# docker-compose.yaml: containers reach each other by service name; Envoy listens on all
# interfaces inside its container (the compose file decides what the host sees).
COMPOSE = EnvoyParams(
    listen_address="0.0.0.0",
    admin_address="0.0.0.0",
    ratelimit_host="ratelimit",
    upstream_host="upstream",
)

COMPOSE_HEADER = (
    "# GENERATED from envoy/envoy.tmpl.yaml and envoy/identity.lua by\n"
    "# `python scripts/envoy_config.py --write-compose`: edit those, not this file.\n"
)


def render(params: EnvoyParams, template: str | None = None) -> str:
    """The template with every placeholder replaced; an unknown placeholder is an error."""
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    values = params.values()

    def line_with_values(line: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in values:
                raise KeyError(f"{TEMPLATE.name}: unknown placeholder ${{{name}}}")
            indent = " " * match.start()
            first, *rest = values[name].split("\n")
            return "\n".join([first, *(indent + part if part else "" for part in rest)])

        return _PLACEHOLDER.sub(substitute, line)

    return "".join(line_with_values(line) for line in text.splitlines(keepends=True))


def render_compose() -> str:
    return COMPOSE_HEADER + render(COMPOSE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write-compose", action="store_true", help=f"write {COMPOSE_CONFIG}")
    group.add_argument("--check-compose", action="store_true", help="fail if it is stale")
    args = parser.parse_args(argv)
    if args.write_compose:
        COMPOSE_CONFIG.write_text(render_compose(), encoding="utf-8")
        print(f"wrote {COMPOSE_CONFIG.relative_to(ROOT)}")
        return 0
    if args.check_compose:
        if not COMPOSE_CONFIG.exists() or COMPOSE_CONFIG.read_text("utf-8") != render_compose():
            print(f"{COMPOSE_CONFIG.relative_to(ROOT)} is stale: run {sys.argv[0]} --write-compose")
            return 1
        return 0
    sys.stdout.write(render(EnvoyParams()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

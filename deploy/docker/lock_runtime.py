"""Write deploy/docker/constraints.txt: the exact versions of midasheng-live's runtime dependencies
(no extras), as installed in the environment that runs this script. The images install the
project with ``-c constraints.txt`` so that a rebuild gets the same packages as the tested tree.

    .venv/bin/python deploy/docker/lock_runtime.py
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

OUT = Path(__file__).with_name("constraints.txt")
SKIP = {"torch"}  # pinned by the Dockerfiles themselves (CPU or CUDA build of the same version)


def _name(requirement: str) -> str:
    return re.split(r"[\s;\[<>=!~(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(root: str) -> dict[str, str]:
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency of another platform or Python
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(_name(req))
    seen.pop(root, None)
    return seen


def main() -> None:
    pins = closure("midasheng-live")
    lines = [
        "# Runtime dependencies of midasheng-live, exact versions (deploy/docker/lock_runtime.py).",
        "# torch is pinned in the Dockerfiles (CPU wheel or CUDA wheel, same version).",
        *(f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items()) if name not in SKIP),
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(lines) - 2} packages)")


if __name__ == "__main__":
    main()

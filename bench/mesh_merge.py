"""One bench/mesh_runs.py file from several (bench/mesh_sweep.sh runs one per config): the runs keyed
`<label>/<layout>`, where <label> is the directory each file lies in (the config's name in mesh_sweep.sh).

    python3 bench/mesh_merge.py OUT.json DIR/*/mesh_runs.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(paths: list[Path]) -> dict:
    out = {"format": "moemesh mesh_runs merged 1", "sources": [], "launches": [], "runs": {}, "errors": []}
    for path in paths:
        data = json.loads(path.read_text())
        for key in ("command", "torch", "worker_torch", "gpu", "gpus", "date", "steps", "warmup", "profile_steps"):
            out.setdefault(key, data.get(key))
        out["sources"].append({"label": path.parent.name, "command": data.get("command"), "date": data.get("date"),
                               "script_s": data.get("script_s")})
        out["launches"] += data.get("launches", [])
        out["errors"] += data.get("errors", [])
        for key, run in data["runs"].items():
            out["runs"][f"{path.parent.name}/{key.split('/', 1)[1]}"] = run
    out.pop("command", None)  # each source's command is in "sources"
    return out


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    Path(sys.argv[1]).write_text(json.dumps(merge([Path(p) for p in sys.argv[2:]]), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

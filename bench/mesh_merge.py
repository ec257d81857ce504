"""One bench/mesh_runs.py file from several (bench/mesh_sweep.sh runs one per config): the runs keyed
`<label>/<layout>`, where <label> is the directory each file lies in (the config's name in mesh_sweep.sh).

    python3 bench/mesh_merge.py OUT.json DIR/*/mesh_runs.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fail(message: str):
    """Bad input: one line, exit 2, and the output file untouched."""
    print(f"mesh_merge: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge(paths: list[Path]) -> dict:
    out = {"format": "moemesh mesh_runs merged 1", "sources": [], "launches": [], "runs": {}, "errors": []}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(f"{path}: not a readable JSON file ({exc.__class__.__name__})")
        for key in ("torch", "worker_torch", "gpu", "gpus", "date", "steps", "warmup", "profile_steps"):
            out.setdefault(key, data.get(key))
        for key in ("steps", "warmup"):  # the planner reads every run's timed steps by the file's warm-up
            if data.get(key) != out[key]:
                fail(f"{path} has {key}={data.get(key)}, the first file {out[key]}")
        out["sources"].append({"label": path.parent.name, "command": data.get("command"), "date": data.get("date"),
                               "script_s": data.get("script_s")})
        out["launches"] += data.get("launches", [])
        out["errors"] += data.get("errors", [])
        for key, run in data["runs"].items():
            label = f"{path.parent.name}/{key.split('/', 1)[1]}"
            if label in out["runs"]:
                fail(f"{label} is in two files (each config's runs need a directory of their own)")
            out["runs"][label] = run
    return out


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    target = Path(sys.argv[1])
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(merge([Path(p) for p in sys.argv[2:]]), indent=1) + "\n")
    partial.replace(target)  # never half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())

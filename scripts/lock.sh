#!/usr/bin/env bash
# Rewrite envs/requirements.lock: the exact versions of everything `pip install -e ".[test]"` installs, taken
# from the active environment (the one the test suite just passed in), plus the two test references.
# Run it after changing a dependency in pyproject.toml, then run the suite from a clean clone (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
freeze=$(mktemp) report=$(mktemp)
pip freeze --exclude-editable > "$freeze"
pip install -q --dry-run --ignore-installed --report "$report" -c "$freeze" -e ".[test]" 2> /dev/null
{
  echo "# The software stack spinecohort is tested with (Python 3.11, Linux x86_64): pip constraints, written by"
  echo "# scripts/lock.sh. Install: pip install -c envs/requirements.lock -e \".[test]\" (docs/cluster.md)."
  python - "$report" <<'PY'
import json, sys
pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
pins.pop("spinecohort")
pins.update({"panoptica": "2.1.7", "SPINEPS": "2.1.3"})  # the tests' references, installed with --no-deps
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda p: p[0].lower())))
PY
} > envs/requirements.lock
rm -f "$freeze" "$report"

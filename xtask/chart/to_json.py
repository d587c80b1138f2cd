"""Split `helm template` output (YAML, many documents) into a JSON list of objects.

Run with the tools venv's python (kubernetes-validate brings PyYAML). Usage:
    to_json.py RENDERED.yaml OUT.json
"""
import json
import sys

import yaml

with open(sys.argv[1]) as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
for d in docs:
    if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
        sys.exit(f"{sys.argv[1]}: a rendered document is not a Kubernetes object: {str(d)[:120]}")
with open(sys.argv[2], "w") as f:
    json.dump(docs, f)

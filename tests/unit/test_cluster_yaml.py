"""cluster.yaml is a config Ray's cluster launcher accepts, keeps token auth on, and keeps the dashboard private."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_launcher_schema_accepts_it():
    """The same JSON schema `ray up` validates against (ray/autoscaler/ray-schema.json)."""
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    config = load()
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]



def test_token_auth_stays_on_and_dashboard_is_not_public():
    config = load()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        assert not re.search(r"RAY_AUTH_MODE=(disabled|none)", cmd), cmd
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host" in head, "Ray's default dashboard host is loopback; say which one is used"
    assert not re.search(r"--dashboard-host[= ]0\.0\.0\.0", head), "the dashboard/job API must not listen on every interface"


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id|AKIA[0-9A-Z]{16})", text)

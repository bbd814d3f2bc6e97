"""The application config and the `kvserve` command line, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve.cluster.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def kvserve(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVSERVE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "kvserve.cluster.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_shipped_configs_are_valid(tmp_path):
    for path in (ROOT / "configs").glob("*.yaml"):
        result = kvserve("validate", str(path), home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout


def test_unknown_keys_and_bad_values_name_the_key(tmp_path, tiny_checkpoints):
    model = str(tiny_checkpoints["llama"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"engine:\n  model: {model}\n  blok_size: 16\nserving:\n  replicas: 0\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    assert "engine.blok_size: unknown key" in str(error.value)
    assert "serving.replicas" in str(error.value)
    result = kvserve("validate", str(bad), home=tmp_path)
    assert result.returncode == 2 and "engine.blok_size" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flags_override_the_file(tmp_path, tiny_checkpoints):
    config = load_config(ROOT / "configs" / "cpu-default.yaml",
                         {"engine": {"model": str(tiny_checkpoints["qwen2"])}, "serving": {"replicas": 3, "router": None}})
    assert config.serving.replicas == 3 and config.serving.router == "kv"
    assert config.served_model_name() == "qwen2"


def test_generate_json_on_the_built_in_model(tmp_path):
    result = kvserve("generate", "--prompt", "Hello", "--prompt", "Once upon a time", "--max-tokens", "5",
                     "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in records] == ["Hello", "Once upon a time"]
    for record in records:
        assert len(record["token_ids"]) <= 5 and record["finish_reason"] in ("length", "stop")
        assert isinstance(record["text"], str)


def test_generate_reports_a_missing_model_folder(tmp_path):
    result = kvserve("generate", "--model", str(tmp_path / "nowhere"), home=tmp_path)
    assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr

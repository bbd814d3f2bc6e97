"""The application config and the `kvserve` command line, run as a user runs them."""

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from kvserve.cluster.cli import CONFIG_FLAGS, build_parser, config_overrides
from kvserve.cluster.config import ConfigError, ServingConfig, load_config, parse_config
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.models.config import DTYPES

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"engine": EngineConfig, "serving": ServingConfig}
# The flags of `serve` and `generate` that set no config field.
OTHER_FLAGS = {"--help", "--config", "--address", "--prompt", "--max-tokens", "--temperature", "--top-p", "--seed",
               "--json", "--lora"}


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
    assert result.returncode == 1 and "engine.blok_size" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flags_override_the_file(tmp_path, tiny_checkpoints):
    config = load_config(ROOT / "configs" / "cpu-default.yaml",
                         {"engine": {"model": str(tiny_checkpoints["qwen2"])}, "serving": {"replicas": 3, "router": None}})
    assert config.serving.replicas == 3 and config.serving.router == "kv"
    assert config.served_model_name() == "qwen2"


def test_a_replica_takes_a_full_batch_unless_the_config_caps_it(tiny_checkpoints):
    engine = {"model": str(tiny_checkpoints["llama"]), "max_num_seqs": 24}
    assert parse_config({"engine": engine}).serving.max_ongoing_requests == 24
    capped = parse_config({"engine": engine, "serving": {"max_ongoing_requests": 8}})
    assert capped.serving.max_ongoing_requests == 8
    with pytest.raises(ConfigError, match="serving.max_ongoing_requests"):
        parse_config({"engine": engine, "serving": {"max_ongoing_requests": 0}})


def test_one_kv_event_hub_per_128_replicas_unless_the_config_says(tiny_checkpoints):
    from kvserve.cluster.app import router_config

    engine = {"model": str(tiny_checkpoints["llama"])}
    hubs = {replicas: parse_config({"engine": engine, "serving": {"replicas": replicas}}).serving.event_hubs()
            for replicas in (1, 128, 129, 512)}
    assert hubs == {1: 1, 128: 1, 129: 2, 512: 4}
    config = parse_config({"engine": engine, "serving": {"replicas": 2, "kv_event_hubs": 3}})
    assert config.serving.event_hubs() == 3
    assert router_config(config).request_router_kwargs["kv_event_hubs"] == 3
    with pytest.raises(ConfigError, match="serving.kv_event_hubs"):
        parse_config({"engine": engine, "serving": {"kv_event_hubs": 0}})


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
    assert result.returncode == 1 and "config.json" in result.stderr and "Traceback" not in result.stderr


def verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (verbs,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return verbs.choices


def test_every_config_flag_sets_a_field_and_shows_its_description():
    flags = {flag.option: flag for flag in CONFIG_FLAGS}
    verbs = verb_parsers(build_parser())
    seen = set()
    for verb in ("serve", "generate"):
        for action in verbs[verb]._actions:
            if OTHER_FLAGS.intersection(action.option_strings):
                continue
            option = action.option_strings[0]
            flag = flags[option]
            field = SECTIONS[flag.section].model_fields[flag.field]
            assert action.dest == flag.field and action.default is None, option
            assert field.description and action.help.startswith(field.description), option
            annotation = field.annotation
            if get_origin(annotation) is Literal:
                assert tuple(action.choices) == get_args(annotation), option
            seen.add(option)
    assert seen == set(flags)


def test_flags_given_override_the_file_and_the_rest_leave_it(tmp_path):
    args = build_parser().parse_args(["serve", "--config", str(ROOT / "configs" / "cpu-default.yaml"),
                                      "--tp", "2", "--no-prefix-caching", "--port", "9000"])
    assert config_overrides(args) == {"engine": {"tp_size": 2, "enable_prefix_caching": False},
                                      "serving": {"port": 9000}}
    config = load_config(args.config, config_overrides(args), lambda: str(tmp_path))
    assert config.engine.tp_size == 2 and not config.engine.enable_prefix_caching and config.serving.port == 9000
    assert config.engine.device == "cpu" and config.serving.replicas == 2  # from the file


def test_bench_tp_keeps_its_own_tp_flag():
    args = build_parser().parse_args(["bench", "tp", "--tp", "1", "--dtype", "float32"])
    assert args.tp == 1 and config_overrides(args) == {"engine": {"dtype": "float32"}}


def test_dtype_names_are_the_torch_dtypes():
    assert set(get_args(EngineConfig.model_fields["dtype"].annotation)) == {"auto", *DTYPES}


def test_version(tmp_path):
    result = kvserve("--version", home=tmp_path)
    assert result.returncode == 0 and version("kvserve") in result.stdout


def test_help_imports_neither_torch_nor_ray():
    code = (
        "import contextlib, io, sys\n"
        "from kvserve.cluster.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['generate', '--help'], ['bench', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "loaded = [name for name in ('torch', 'ray') if name in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

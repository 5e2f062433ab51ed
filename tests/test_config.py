"""Config schema: the embedded defaults, the shipped files, and the errors a user sees."""

import subprocess
import sys
from pathlib import Path

import pytest

from persd_online.config import Config, ConfigError, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_default_file_is_the_embedded_defaults():
    assert load_config(CONFIGS / "cpu-smollm2.yaml") == Config() == load_config(None)
    # The file is generated from the schema (`make config-file`); it must not drift from it.
    body = (CONFIGS / "cpu-smollm2.yaml").read_text().split("\n", 3)[3]
    assert body == dump_config(Config(), comments=True)


def test_cluster_example_validates():
    config = load_config(CONFIGS / "cluster-gpu.yaml")
    assert config.teacher.kind == "openai" and config.student.num_gpus == 1
    assert config.trainer.dtype == "bfloat16" and config.eval.limit is None


def test_overrides_parse_yaml_values():
    config = load_config(None, ["trainer.lr=1e-4", "eval.tasks=[mbpp:test, humaneval]", "teacher.cache=false",
                                "trainer.lora.r=8"])
    assert config.trainer.lr == 1e-4 and config.eval.tasks == ["mbpp:test", "humaneval"]
    assert config.teacher.cache is False and config.trainer.lora.r == 8


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.lr=abc"], "trainer.lr: Input should be a valid number"),
    (["trainer.bogus=1"], "trainer.bogus: unknown key"),
    (["student.max_loras=1"], "student.max_loras (1) must be at least max_staleness + 1 (2)"),
    (["trainer.lora.r=32"], "student.max_lora_rank (16) is below trainer.lora.r (32)"),
    (["teacher.kind=openai"], "teacher.kind 'openai' needs teacher.base_url and teacher.model"),
    (["student.prompt_format=xml"], "student.prompt_format: Input should be 'chat' or 'completion'"),
    (["trainer.lr=-1"], "trainer.lr: Input should be greater than 0"),
    (["trainer.lr"], "expected KEY.PATH=VALUE"),
    (["trainer.lr=1e-4", "trainer.lr.x=1"], "'lr' is a value, not a section"),
])
def test_bad_values_name_the_key_path(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("student: {model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("studnet:\n  model: x\n")
    with pytest.raises(ConfigError, match=r"typo.yaml:\n  studnet: unknown key"):
        load_config(tmp_path / "typo.yaml")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "persd_online", "config", "--set", "sandbox.workers=0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "sandbox.workers: Input should be greater than or equal to 1 (got 0)" in result.stderr

"""Config schema: the embedded defaults, the shipped files, and the errors a user sees."""

import subprocess
import sys
from pathlib import Path

import pytest

from persd_online.config import (
    Config,
    ConfigError,
    Resources,
    StudentConfig,
    TrainerConfig,
    dump_config,
    format_cores,
    load_config,
    parse_cores,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_default_file_is_the_embedded_defaults():
    assert load_config(CONFIGS / "cpu-smollm2.yaml") == Config() == load_config(None)
    # The file is generated from the schema (`make config-file`); it must not drift from it.
    body = (CONFIGS / "cpu-smollm2.yaml").read_text().split("\n", 3)[3]
    assert body == dump_config(Config(), comments=True)


def test_cluster_example_validates():
    config = load_config(CONFIGS / "cluster-gpu.yaml")
    assert config.teacher.kinds == ["self", "reference_repair", "openai"] and config.student.resources.num_gpus == 1
    assert config.teacher.tiers[2].label == "openai:gpt-4o-mini"
    assert config.trainer.dtype == "bfloat16" and config.eval.limit is None


def test_single_gpu_example_is_colocated_on_one_gpu_with_the_engine_asleep_while_training():
    from persd_online.placement import place, resolve

    config = load_config(CONFIGS / "single-gpu.yaml")
    assert resolve(config, gpus=1, local=True) == "colocated"
    assert resolve(config.model_copy(update={"placement": "auto"}), gpus=1, local=False) == "colocated"
    placed = place(config, "colocated")
    assert placed.student.sleep_mode and placed.trainer.device == "cuda"
    assert placed.student.resources.num_gpus + placed.trainer.resources.num_gpus <= 1


def test_overrides_parse_yaml_values():
    config = load_config(None, ["trainer.lr=1e-4", "eval.tasks=[mbpp:test, humaneval]", "trainer.lora.r=8",
                                "teacher.tiers=[{kind: reference_repair}, {kind: openai, base_url: 'http://h/v1', "
                                "model: m, cache: false}]"])
    assert config.trainer.lr == 1e-4 and config.eval.tasks == ["mbpp:test", "humaneval"]
    assert config.teacher.tiers[1].cache is False and config.trainer.lora.r == 8
    assert [t.label for t in config.teacher.tiers] == ["reference_repair", "openai:m"]


BAD_CORE_LISTS = [  # what is wrong, where, and how to write it
    (["student.cpu_cores=0-x"], "student.cpu_cores: '0-x' is not a core number or a range of them; write core numbers "
     "and ranges like '0-3,6', or a list like [0, 1, 2, 3, 6]; null for none (got '0-x')"),
    (["trainer.cpu_cores=3-1"], "trainer.cpu_cores: the range '3-1' runs backwards; write it as '1-3' (got '3-1')"),
    (["trainer.cpu_cores=[0, -1]"], "trainer.cpu_cores: -1 is not a core number (a whole number >= 0)"),
    (["trainer.cpu_cores=[a]"], "trainer.cpu_cores: 'a' is not a core number"),
    (["student.cpu_cores=[]"], "student.cpu_cores: the core list is empty; write core numbers"),
    (["student.cpu_cores=0,,1"], "student.cpu_cores: '' is not a core number or a range of them"),
    (["student.cpu_cores=true"], "student.cpu_cores: a core list must be a string or a list, not bool"),
    (["student.cpu_cores=1.5"], "student.cpu_cores: a core list must be a string or a list, not float"),
]
BAD_RESOURCES = [
    (["curriculum.num_cpus=2"], "curriculum.num_cpus: unknown key"),
    (["trainer.resources.cpus=2"], "trainer.resources.cpus: unknown key"),
    (["sandbox.resources.max_restarts=-2"], "sandbox.resources.max_restarts: Input should be greater than or equal "
     "to -1"),
    (["eval.resources.num_gpus=-1"], "eval.resources.num_gpus: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.lr=abc"], "trainer.lr: Input should be a valid number"),
    (["trainer.bogus=1"], "trainer.bogus: unknown key"),
    (["student.max_loras=1"], "student.max_loras (1) must be at least max_staleness + 1 (2)"),
    (["trainer.lora.r=32"], "student.max_lora_rank (16) is below trainer.lora.r (32)"),
    (["teacher.tiers=[{kind: openai}]"], "teacher.tiers.0.openai.base_url: Field required"),
    (["teacher.tiers=[{kind: oracle}]"], "teacher.tiers.0: Input tag 'oracle' found using 'kind' does not match"),
    (["teacher.tiers=[]"], "teacher.tiers: name at least one tier"),
    (["teacher.tiers=[{kind: self}, {kind: self}]"], "name one tier twice"),
    (["student.prompt_format=xml"], "student.prompt_format: Input should be 'chat' or 'completion'"),
    (["trainer.lr=-1"], "trainer.lr: Input should be greater than 0"),
    (["trainer.lr"], "expected KEY.PATH=VALUE"),
    (["trainer.lr=1e-4", "trainer.lr.x=1"], "'lr' is a value, not a section"),
    *BAD_CORE_LISTS, *BAD_RESOURCES,
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


@pytest.mark.parametrize(("value", "cores"), [
    ("0-3,6", [0, 1, 2, 3, 6]),
    ("6, 0-1", [0, 1, 6]),
    ("2", [2]),
    (2, [2]),
    ([3, 1, 1], [1, 3]),
    ("0-1,1-2", [0, 1, 2]),
])
def test_core_lists_take_strings_and_lists(value, cores):
    assert parse_cores(value) == cores
    assert StudentConfig(cpu_cores=value).cpu_cores == cores == TrainerConfig(cpu_cores=value).cpu_cores


def test_core_lists_from_yaml_and_overrides(tmp_path):
    (tmp_path / "cores.yaml").write_text("student:\n  cpu_cores: 0-2\ntrainer:\n  cpu_cores: [3]\n")
    config = load_config(tmp_path / "cores.yaml", ["trainer.cpu_cores=3-4,7"])
    assert config.student.cpu_cores == [0, 1, 2] and config.trainer.cpu_cores == [3, 4, 7]
    assert load_config(None, ["student.cpu_cores=null"]).student.cpu_cores is None
    assert Config().student.cpu_cores == [0] and Config().trainer.cpu_cores == [1]


def test_core_lists_format_back_to_ranges():
    assert format_cores([6, 0, 1, 2, 3]) == "0-3,6"
    assert format_cores([0]) == "0" and format_cores([1, 3, 4]) == "1,3-4"
    assert parse_cores(format_cores([0, 2, 3, 4, 9])) == [0, 2, 3, 4, 9]


@pytest.mark.parametrize(("section", "expected"), [
    ("student", Resources(num_cpus=1.0, num_gpus=0.0, max_restarts=3)),
    ("teacher", Resources(num_cpus=0.1, num_gpus=0.0, max_restarts=0)),
    ("sandbox", Resources(num_cpus=0.5, num_gpus=0.0, max_restarts=-1)),
    ("trainer", Resources(num_cpus=1.0, num_gpus=0.0, max_restarts=1)),
    ("eval", Resources(num_cpus=0.1, num_gpus=0.0, max_restarts=0)),
])
def test_each_actor_section_has_its_own_resource_defaults(section, expected):
    resources = getattr(Config(), section).resources
    assert resources == expected
    assert resources.ray_options() == {"num_cpus": expected.num_cpus, "num_gpus": expected.num_gpus,
                                       "max_restarts": expected.max_restarts}
    # A partial override keeps the section's defaults for the keys it leaves out.
    partial = getattr(load_config(None, [f"{section}.resources.num_gpus=2"]), section).resources
    assert partial == expected.model_copy(update={"num_gpus": 2.0})


def test_resources_keep_section_defaults_in_code_too():
    assert StudentConfig(resources=Resources(num_gpus=1)).resources == Resources(num_cpus=1, num_gpus=1,
                                                                                  max_restarts=3)
    config = Config()
    config.trainer.resources = {"num_cpus": 4}
    assert config.trainer.resources == Resources(num_cpus=4, max_restarts=1)


def test_resource_keys_of_the_old_layout_still_load(tmp_path, caplog):
    # A run directory's config.yaml written before `resources` existed (read again by --resume).
    (tmp_path / "config.yaml").write_text("student:\n  num_cpus: 2\n  cpu_cores: '0'\nsandbox:\n  num_cpus: 1\n"
                                          "  max_restarts: 3\n")
    config = load_config(tmp_path / "config.yaml", ["student.resources.num_gpus=1"])
    assert config.student.resources == Resources(num_cpus=2, num_gpus=1, max_restarts=3)
    assert config.sandbox.resources == Resources(num_cpus=1, max_restarts=3) and config.student.cpu_cores == [0]
    assert "student.num_cpus moved under student.resources" in caplog.text
    with pytest.raises(ConfigError) as info:
        load_config(None, ["student.num_cpus=2", "student.resources.num_cpus=3"])
    assert str(info.value).endswith("\n  (top level): student.num_cpus is given twice, also as "
                                    "student.resources.num_cpus; keep only student.resources.num_cpus")


def test_serve_lora_of_older_runs_reads_as_serving(tmp_path, caplog):
    (tmp_path / "config.yaml").write_text("student:\n  serve_lora: true\n")
    assert load_config(tmp_path / "config.yaml").student.serving == "lora"
    assert "student.serve_lora is now student.serving" in caplog.text
    assert load_config(None, ["student.serve_lora=false"]).student.serving == "plain"
    assert load_config(None, []).student.serving == "merged"
    with pytest.raises(ConfigError, match="keep only student.serving"):
        load_config(None, ["student.serve_lora=true", "student.serving=lora"])

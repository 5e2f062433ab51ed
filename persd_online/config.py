"""The run configuration: one validated schema, loaded from YAML with `--set a.b=c` overrides.

The schema's defaults *are* the embedded default run (`configs/cpu-smollm2.yaml` spells them out): a run
sized for a 2-core CPU machine. Every actor receives its own section of one `Config` object; nothing
below the CLI reads environment variables except the teacher's API key, whose variable name is configured.

Each section that starts a Ray actor holds its request in `resources` (`Resources`); the defaults differ per
section, and a partial `resources` mapping keeps the section's defaults for the keys it leaves out (a config
written before `resources` existed, with `student.num_cpus` and the like, still loads, with a warning). Core lists
(`student.cpu_cores`, `trainer.cpu_cores`) are one type, `CoreList`: '0-3,6' or [0, 1, 2, 3, 6], validated to
a sorted list of core numbers.

Invariants: unknown keys and wrong types fail at load time with the key path and the expected type;
cross-section constraints (LoRA rank, adapter slots versus staleness, teacher endpoint) are checked here,
not discovered by an actor minutes into a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_CORES_HINT = "write core numbers and ranges like '0-3,6', or a list like [0, 1, 2, 3, 6]; null for none"


def parse_cores(value: Any) -> list[int]:
    """A core list as sorted, distinct core numbers, from '0-3,6', a list of core numbers, or one core number.

    Raises ValueError naming the bad part and the accepted forms.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | list | tuple):
        raise ValueError(f"a core list must be a string or a list, not {type(value).__name__}; {_CORES_HINT}")
    if isinstance(value, int):
        value = [value]
    cores: set[int] = set()
    if isinstance(value, str):
        for part in value.replace(" ", "").split(","):
            first, dash, last = part.partition("-")
            if not (first.isdigit() and (not dash or last.isdigit())):
                raise ValueError(f"{part!r} is not a core number or a range of them; {_CORES_HINT}")
            if dash and int(first) > int(last):
                raise ValueError(f"the range {part!r} runs backwards; write it as '{last}-{first}'")
            cores.update(range(int(first), int(last if dash else first) + 1))
    else:
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise ValueError(f"{item!r} is not a core number (a whole number >= 0); {_CORES_HINT}")
            cores.add(item)
    if not cores:
        raise ValueError(f"the core list is empty; {_CORES_HINT}")
    return sorted(cores)


def format_cores(cores: Iterable[int]) -> str:
    """Core numbers as a compact '0-3,6' string (the form vLLM's VLLM_CPU_OMP_THREADS_BIND and taskset take)."""
    ranges: list[list[int]] = []
    for core in sorted(set(cores)):
        if ranges and core == ranges[-1][1] + 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


CoreList = Annotated[list[int], BeforeValidator(parse_cores)]
"""CPU core numbers, sorted and distinct; YAML and `--set` take '0-3,6', [0, 1, 2, 3, 6] or a single number."""


class Resources(_Section):
    """What this section's Ray actor asks the cluster for, and how often Ray restarts it."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor (a share of a core is fine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor.")
    max_restarts: int = Field(0, ge=-1, description="Times Ray restarts a dead actor (-1: without limit).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the actor's process "
                                "(Ray runtime_env), set before it starts, e.g. OMP_WAIT_POLICY.")

    def ray_options(self) -> dict[str, Any]:
        """These as keyword arguments of a Ray actor's `.options(...)` (`env` as its runtime_env)."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                   "max_restarts": self.max_restarts}
        if self.env:
            options["runtime_env"] = {"env_vars": dict(self.env)}
        return options


def _resources(**defaults: Any) -> Callable[[], Resources]:
    """A section's default `Resources` (the default_factory of its `resources` field)."""
    return lambda: Resources(**defaults)


class _ActorSection(_Section):
    """A section that starts Ray actors: its `resources` field (default_factory `_resources(...)`) is their request."""

    @field_validator("resources", mode="before", check_fields=False)
    @classmethod
    def _keep_section_defaults(cls, value: Any) -> Any:
        """A partial `resources` (e.g. `--set student.resources.num_cpus=2`) keeps this section's defaults for
        the keys it leaves out, not the generic ones of `Resources`."""
        if isinstance(value, Resources):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, dict):
            default = cls.model_fields["resources"].get_default(call_default_factory=True)
            return {**default.model_dump(), **value}
        return value


class StudentConfig(_ActorSection):
    """The student served by vLLM; adapter versions merged into its weights or served as LoRA (`serving`)."""

    model: str = Field("smollm2-135m-instruct", description="A name `prepare-model` knows, or a checkpoint path.")
    backend: Literal["vllm", "vllm_server"] = Field(
        "vllm", description="`vllm`: an engine inside a Ray actor; `vllm_server`: an external `vllm serve`."
    )
    server_url: str | None = Field(None, description="Base URL of the external server (backend vllm_server).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="float32 on CPU (bf16 was ~8x slower on the reference CPU)."
    )
    max_model_len: int = Field(2048, ge=256)
    cpu_kvcache_gib: float = Field(2.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU engines.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = Field(True, description="Skip graph compilation (~40 s on CPU).")
    serving: Literal["merged", "lora", "plain"] = Field(
        "merged", description="merged: the engine's weights are reloaded in place with the requested version "
        "merged in (W + s·BA), one version at a time (LoRA serving cost ~3x the tokens/s on the CPU engine); "
        "lora: vLLM LoRA, several versions in one batch; plain: the checkpoint's weights only (version 0).")
    max_lora_rank: int = Field(16, ge=1)
    max_loras: int = Field(3, ge=1, description="Adapter versions kept loaded at once.")
    sleep_mode: bool = Field(False, description="GPU engines: vLLM's sleep mode, the engine asleep (level 1: KV "
                             "cache freed, weights offloaded) during training phases; the colocated placement "
                             "on a GPU turns it on.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_serve_lora(cls, data: Any) -> Any:
        """Read `serve_lora` (before `serving`, e.g. an older run's config.yaml on --resume): true as
        `serving: lora`, false as `serving: plain`, with a warning; both keys at once is an error."""
        if not (isinstance(data, dict) and "serve_lora" in data):
            return data
        if "serving" in data:
            raise ValueError("student.serve_lora and student.serving are both given; keep only student.serving")
        data = dict(data)
        serving = "lora" if data.pop("serve_lora") in (True, "true", "True", 1) else "plain"
        log.warning("config: student.serve_lora is now student.serving; read as serving: %s", serving)
        return data | {"serving": serving}
    prompt_format: Literal["chat", "completion"] = Field(
        "chat", description="chat: the instruct template, fenced code extracted; completion: header + body."
    )
    max_new_tokens: int = Field(256, ge=1)
    stop_at_program_end: bool = Field(True, description="Stop generating where the program ends: the closing "
                                      "code fence (chat), the next top-level statement (completion).")
    stop_repetition: bool = Field(True, description="End a generation whose last tokens repeat one block "
                                  "(persd_online.repetition); outputs that end normally are unchanged.")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    samples_per_task: int = Field(2, ge=1)
    tasks_per_batch: int = Field(8, ge=1, description="Tasks per generate call.")
    seed: int = 0
    cpu_cores: CoreList | None = Field(
        default_factory=lambda: [0], description="CPU engines: cores for vLLM's OpenMP threads "
        "(VLLM_CPU_OMP_THREADS_BIND; '0-3' or [0, 1, 2, 3]); null: vLLM's own choice. Keep apart from "
        "trainer.cpu_cores so the two do not fight.")
    num_actors: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=_resources(num_cpus=1.0, max_restarts=3))


class _Tier(_Section):
    """What every teacher tier has: a kind, a name, and the cascade's floor (`cascade.should_try`)."""

    kind: str
    name: str | None = Field(None, description="Names the tier in metrics and the summary (default: its kind; "
                             "openai tiers: openai:<model>).")
    min_verified_rate: float = Field(0.0, ge=0, le=1, description="Skip the tier while its verified rate is below "
                                     "this after `warmup` tries (still trying every probe_every-th failure).")
    warmup: int = Field(20, ge=0, description="Tries before the floor applies.")
    probe_every: int = Field(10, ge=1, description="Below its floor, still try every N-th failure that reaches it.")

    @property
    def label(self) -> str:
        return self.name or self.kind


class SelfRepairTier(_Tier):
    """`self`: the student repairs its own attempt from the execution feedback (persd_online.self_repair)."""

    kind: Literal["self"] = "self"
    samples: int = Field(2, ge=1, description="Repairs sampled per failed attempt; the first that passes is kept.")
    temperature: float = Field(0.8, ge=0)
    min_verified_rate: float = Field(0.05, ge=0, le=1, description="Skip self-repair while it fixes fewer than "
                                     "this share of the failures it tries (it costs student time).")
    warmup: int = Field(8, ge=0, description="Tries before the floor applies (each costs student generation "
                        "time; the 135M base student repaired 0 of 25 MBPP-train failures: "
                        "benchmarks/teacher_cascade.py).")
    probe_every: int = Field(25, ge=1, description="Below its floor, still try every N-th failure that reaches it.")


class ReferenceRepairTier(_Tier):
    """`reference_repair`: the smallest verified edit of the attempt toward the task's reference
    (persd_online.reference_repair); needs a reference, and is not an LLM teacher."""

    kind: Literal["reference_repair"] = "reference_repair"
    candidate_budget: int = Field(256, ge=1, description="Sandbox runs one refinement may spend on candidate "
                                  "edits (the normalisations included); candidates that do not compile cost none.")
    on_no_edit: Literal["reference", "next_tier"] = Field(
        "reference", description="When no edit passes within the budget: reference: return the reference itself "
        "(recorded personalised: false); next_tier: return nothing, so the cascade tries its next tier.")
    batch: int = Field(32, ge=1, description="Candidates verified per sandbox batch (one gather of executor runs).")


class OracleTier(_Tier):
    """`reference_oracle`: the task's reference solution: an oracle (InpD), not PERsD."""

    kind: Literal["reference_oracle"] = "reference_oracle"


class OpenAITier(_Tier):
    """`openai`: any OpenAI-compatible endpoint, asked to correct the student's own attempt."""

    kind: Literal["openai"] = "openai"
    base_url: str
    model: str
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    include_reference: bool = Field(False, description="Show the task's reference solution to the teacher.")
    refine_rounds: int = Field(1, ge=0, description="Extra rounds for a refinement that fails its tests.")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=1)
    max_concurrency: int = Field(4, ge=1, description="Requests in flight to this endpoint.")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    price_per_prompt_token: float = Field(0.0, ge=0, description="USD per prompt token.")
    price_per_completion_token: float = Field(0.0, ge=0, description="USD per completion token.")
    budget_tokens: int | None = Field(None, ge=0, description="Stop this tier's calls after this many tokens.")
    budget_usd: float | None = Field(None, ge=0, description="Stop this tier's calls after this cost.")
    cache: bool = Field(True, description="Content-addressed on-disk cache of requests and responses.")

    @property
    def label(self) -> str:
        return self.name or f"openai:{self.model}"


Tier = Annotated[SelfRepairTier | ReferenceRepairTier | OpenAITier | OracleTier, Field(discriminator="kind")]


class TeacherConfig(_ActorSection):
    """The teacher: tiers tried in order for each failed attempt until one's refinement passes (cascade.py)."""

    tiers: list[Tier] = Field(
        default_factory=lambda: [SelfRepairTier(), ReferenceRepairTier()],
        description="In order, cheapest first: self (the student repairs itself), reference_repair (smallest "
        "verified edit toward the reference), openai (any number: cheap, then strong), reference_oracle (the "
        "reference: InpD, not PERsD).")
    max_concurrency: int = Field(4, ge=1, description="Failed attempts refined at once.")
    resources: Resources = Field(default_factory=_resources(num_cpus=0.1))

    @field_validator("tiers")
    @classmethod
    def _tiers_named_once(cls, tiers: list[Any]) -> list[Any]:
        if not tiers:
            raise ValueError("name at least one tier, e.g. [{kind: self}, {kind: reference_repair}]")
        labels = [t.label for t in tiers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"tiers {labels} name one tier twice: give each a distinct `name`")
        return tiers

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.tiers]

    @property
    def oracle_only(self) -> bool:
        """Every tier answers with the reference itself: the run is InpD, not PERsD."""
        return self.kinds == ["reference_oracle"]


class SandboxConfig(_ActorSection):
    """Executors for untrusted programs."""

    workers: int = Field(2, ge=1, description="Pre-forked workers per sandbox actor.")
    timeout_s: float = Field(5.0, gt=0, description="Wall-clock limit per program.")
    memory_mb: int = Field(1024, ge=64, description="Address-space limit per program.")
    max_in_flight: int = Field(64, ge=1, description="Jobs queued per actor before callers wait.")
    pin_cpus: bool | None = Field(None, description="Pin worker i (its zygote and jobs) to the actor's i-th usable "
                                  "CPU; null: only when the workers cover every usable CPU.")
    num_actors: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=_resources(num_cpus=0.5, max_restarts=-1))


class LoraSection(_Section):
    """The LoRA adapter the trainer learns and the student serves."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainerConfig(_ActorSection):
    """The streaming LoRA trainer."""

    lora: LoraSection = Field(default_factory=LoraSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: fp32 on CPU, bf16 on GPU.")
    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(4, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="After warmup; a stream has no known end, so constant is the default."
    )
    schedule_steps: int = Field(1000, ge=1, description="Decay horizon for linear/cosine schedules.")
    max_grad_norm: float = Field(1.0, gt=0)
    batch_examples: int = Field(4, ge=1, description="Examples per micro-batch.")
    max_batch_tokens: int = Field(2048, ge=64, description="Token budget of a packed micro-batch.")
    grad_accum_steps: int = Field(1, ge=1)
    max_seq_len: int = Field(1024, ge=64)
    publish_every_steps: int = Field(4, ge=1)
    publish_every_s: float | None = Field(None, gt=0, description="Also publish after this many seconds.")
    checkpoint_every_steps: int = Field(24, ge=1)
    replay_fraction: float = Field(0.5, ge=0, lt=1, description="Share of each batch drawn from replay.")
    replay_capacity: int = Field(512, ge=1)
    max_reuse: int = Field(4, ge=1, description="Times one example may be trained on.")
    stale_labels: Literal["replay", "drop"] = Field(
        "replay", description="A verified label that arrives past max_staleness: into the replay buffer, "
        "trained later as replay (staleness bounds personalisation, not correctness), or dropped.")
    torch_threads: int | None = Field(None, ge=1, description="null: one per core in cpu_cores, else torch's own.")
    cpu_cores: CoreList | None = Field(
        default_factory=lambda: [1], description="Cores the trainer process is pinned to ('1-3' or [1, 2, 3]; "
        "null: no pinning); cores not on this machine are ignored with a warning.")
    seed: int = 0
    resources: Resources = Field(default_factory=_resources(num_cpus=1.0, max_restarts=1))


class CurriculumConfig(_Section):
    """Which task to attempt next."""

    policy: Literal["learning_value", "uniform"] = "learning_value"
    retire_after_passes: int = Field(2, ge=1, description="Consecutive passes that retire a task.")
    recheck_prob: float = Field(0.05, ge=0, le=1, description="Chance to re-check a retired task.")
    park_after_teacher_failures: int = Field(2, ge=1, description="Unfixable refinements that park a task.")
    free_label_usd: float = Field(0.001, gt=0, description="What a label from a free tier (self, reference_repair) "
                                  "costs in dollars of compute: learning value is ranked per dollar, "
                                  "value * free_label_usd / (free_label_usd + the task's expected teacher cost per "
                                  "fix), so a task only a paid tier fixes ranks below one that self-repairs.")
    seed: int = 0


class EvalConfig(_ActorSection):
    """Held-out evaluation of the current adapter."""

    tasks: list[str] = Field(default_factory=lambda: ["mbpp:test"], description="Held-out task sets.")
    limit: int | None = Field(100, ge=1, description="Tasks per held-out set (None: all): the base and final "
                              "evaluations score them all, with a 95% interval and a paired test.")
    n_samples: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(320, ge=1)
    cap_factor: float | None = Field(1.5, gt=0, description="Cap each task's new tokens at this many times its "
                                     "reference's length plus cap_margin (persd_online.token_caps); null: no cap.")
    cap_margin: int = Field(32, ge=0)
    every_versions: int | None = Field(None, ge=1, description="Also evaluate every K adapter versions, on the "
                                       "first progress_limit tasks of each set (null: base and final only).")
    progress_limit: int = Field(20, ge=1, description="Tasks of each set a progress evaluation scores.")
    resources: Resources = Field(default_factory=_resources(num_cpus=0.1))


class TasksConfig(_Section):
    """The training task pool."""

    pool: str = Field("mbpp:train", description="humaneval, mbpp, mbpp:<split>, or a path to a JSONL file.")
    limit: int | None = Field(40, ge=1, description="Use the first N tasks of the pool (None: all).")


class RayConfig(_Section):
    address: str | None = Field(None, description="None: join a running cluster if any, else start a local Ray.")
    namespace: str = "persd-online"
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all).")


class BudgetConfig(_Section):
    """When a run stops (whichever comes first)."""

    max_wall_s: float | None = Field(1200.0, gt=0, description="The whole run, wrap-up included.")
    max_attempts: int | None = Field(None, ge=1)
    max_examples: int | None = Field(None, ge=1, description="Examples consumed by optimizer steps (a "
                                     "replayed or repeated example counts each time).")
    max_distinct_examples: int | None = Field(None, ge=1, description="Distinct labels (task, program) sent to "
                                              "the trainer.")
    max_teacher_calls: int | None = Field(None, ge=1)
    max_versions: int | None = Field(None, ge=1)


ArmName = Literal["base", "stand", "inpd", "persd", "online", "online_uniform"]
ARMS: tuple[str, ...] = ("base", "stand", "inpd", "persd", "online", "online_uniform")


class ExperimentConfig(_Section):
    """`persd-online experiment`: arms trained on the same pool, scored on the same held-out sets."""

    arms: list[ArmName] = Field(default_factory=lambda: list(ARMS), description="Arms to run, in this order.")
    match: Literal["examples", "teacher_calls"] = Field(
        "examples", description="What every training arm gets the same amount of: distinct verified examples, "
        "or teacher calls (a reference label counts as one call).")
    budget: int = Field(120, ge=1, description="That amount, per training arm.")
    heldout: list[str] = Field(default_factory=lambda: ["mbpp:test", "humaneval"],
                               description="Held-out sets every arm is scored on.")
    heldout_limit: int | None = Field(None, ge=1, description="First N tasks of each held-out set (None: all).")
    epochs: int = Field(2, ge=1, description="Offline arms: epochs over their examples.")
    online_max_wall_s: float = Field(3600.0, gt=0, description="Online arms: wall-clock cap of the loop.")


class Config(_Section):
    """A whole run."""

    name: str = Field("cpu-smollm2", pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: Path = Path("runs")
    cache_dir: Path | None = Field(None, description="Model cache (None: $PERSD_ONLINE_CACHE or ~/.cache).")
    method: Literal["persd", "persd_refine", "persd_combine"] = "persd"
    max_staleness: int = Field(1, ge=0, description="Versions an attempt may lag the trainer and still train.")
    placement: Literal["auto", "disaggregated", "colocated"] = Field(
        "auto", description="disaggregated: the student and the trainer on devices of their own, at once; "
        "colocated: on the same cores or GPU, taking turns; auto: colocated where they would share devices "
        "(one machine's CPU cores, or one GPU). See persd_online/placement.py.")
    checkpoint_every_s: float = Field(60.0, gt=0, description="Checkpoint the whole run this often (and at the end).")
    seed: int = 0
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_resource_keys(cls, data: Any) -> Any:
        """Read `student.num_cpus` (the layout before `resources`, e.g. an older run's config.yaml on --resume)
        as `student.resources.num_cpus`, with a warning; the same key in both places is an error."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            section = data.get(name)
            if not (isinstance(section, dict) and isinstance(field.annotation, type)
                    and issubclass(field.annotation, _ActorSection)):
                continue
            legacy = {key: section[key] for key in Resources.model_fields if key in section}
            resources = section.get("resources") or {}
            if not legacy or not isinstance(resources, dict):
                continue
            if clash := sorted(set(legacy) & set(resources)):
                raise ValueError(f"{name}.{clash[0]} is given twice, also as {name}.resources.{clash[0]}; "
                                 f"keep only {name}.resources.{clash[0]}")
            log.warning("config: %s moved under %s.resources; read as %s", ", ".join(f"{name}.{k}" for k in legacy),
                        name, ", ".join(f"{name}.resources.{k}" for k in legacy))
            data[name] = {**{k: v for k, v in section.items() if k not in legacy}, "resources": {**resources, **legacy}}
        return data

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        if self.student.max_loras < self.max_staleness + 1:
            raise ValueError(
                f"student.max_loras ({self.student.max_loras}) must be at least max_staleness + 1 "
                f"({self.max_staleness + 1}) so in-flight requests finish on the version they started with"
            )
        if self.student.max_lora_rank < self.trainer.lora.r:
            raise ValueError(
                f"student.max_lora_rank ({self.student.max_lora_rank}) is below trainer.lora.r "
                f"({self.trainer.lora.r}); the engine could not load the trainer's adapters"
            )
        if self.student.backend == "vllm_server" and not self.student.server_url:
            raise ValueError("student.backend 'vllm_server' needs student.server_url")
        if self.placement == "colocated" and self.student.backend != "vllm":
            raise ValueError("placement: colocated needs student.backend: vllm (the loop cannot hand an external "
                             "server's device to the trainer); use placement: disaggregated or auto")
        if self.placement == "colocated" and self.student.num_actors > 1:
            raise ValueError(f"placement: colocated takes one student engine (student.num_actors is "
                             f"{self.student.num_actors}); set student.num_actors=1 or placement: disaggregated")
        return self


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad key path and what was expected."""


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        else:
            # A cross-section error's input is the whole config: its message names the keys instead.
            got = "" if err["type"] == "missing" or not err["loc"] else f" (got {err['input']!r})"
            lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}{got}")
    return f"invalid config in {source}:\n  " + "\n  ".join(lines)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. trainer.lr=1e-4")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The validated config from a YAML file (None: the embedded defaults) plus `--set` overrides."""
    data: dict[str, Any] = {}
    source = "the embedded defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_config(config: Config, comments: bool = False) -> str:
    """The config as YAML, every default spelled out; with `comments`, each key carries its description."""
    if not comments:
        return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return "\n".join(_commented(config, indent=0)) + "\n"


def _commented(section: BaseModel, indent: int) -> list[str]:
    lines = []
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        note = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{name}:" + (f"  # {doc[0]}" if doc else ""))
            lines.extend(_commented(value, indent + 1))
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            lines.append(f"{pad}{name}:{note}")
            for item in value:  # a block sequence of sections, `- ` in place of the first key's indent
                item_lines = _commented(item, indent + 2)
                lines.append(f"{pad}  - " + item_lines[0].lstrip())
                lines.extend(item_lines[1:])
        else:
            rendered = yaml.safe_dump(value if not isinstance(value, Path) else str(value),
                                      default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            lines.append(f"{pad}{name}: {rendered}{note}")
    return lines

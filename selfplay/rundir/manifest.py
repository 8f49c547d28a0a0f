"""Stage manifests, atomic outputs and the skip/refuse rules that make a re-run a resume.

A stage writes its outputs into `round_XX/.tmp-<stage>/`, they are renamed into place only when the stage has
finished, and then `<stage>.done.json` is written last (itself through a temp file and a rename). So a file in
the round directory is either complete or absent, and a manifest exists only over complete outputs.

On a re-run a stage is skipped when its manifest exists, its recorded config equals the current one and its
inputs (the fingerprints of the upstream manifests) are unchanged. A changed config is refused with the keys
that differ; `force=[stage]` redoes it. Changed inputs (an upstream stage was redone) redo it automatically.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from selfplay.config import REMOVED_OPTIONS, Config
from selfplay.errors import SelfplayError
from selfplay.rundir import atomic, faults

MANIFEST_VERSION = 1


class StageConfigChanged(SelfplayError):
    """A finished stage was asked to run again with a different config."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def checksum_outputs(round_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under the named outputs, keyed by path relative to the round dir."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        for file in _files_under(round_dir / name):
            out[file.relative_to(round_dir).as_posix()] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
    return out


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# Upgrades. A manifest records the config schema it was written under ("config_schema"; absent: 1). Reading an
# older manifest's config, today's code:
#   - moves a renamed key to its name today (Migration.renamed_from);
#   - reads a key absent from it as what runs did before the key existed (Migration.before), and any other absent
#     key as its schema default today (selfplay/config.py), and as nothing else: adding an option with a default
#     needs no entry here and never refuses a resume at that default;
#   - for a key whose default changed, keeps the run on its old value: runner/upgrade.py pins Migration.before
#     for a run directory made before the change unless the command line sets the key;
#   - drops a removed key (Migration.removed) when what it recorded is what today's code does (its value was
#     Migration.before, or any value when `before` is NO_VALUE); any other value stays, so the stage is refused with
#     `key: value -> <absent>` and REMOVED_OPTIONS (selfplay/config.py) says what replaced it.
# Bump CONFIG_SCHEMA with each entry; tests/test_upgrade.py resumes a committed run directory made by old code.
CONFIG_SCHEMA = 3


NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda self: "NO_VALUE"})()  # (dataclasses.MISSING means "required")


@dataclass(frozen=True)
class Migration:
    since: int  # the first CONFIG_SCHEMA with the change
    key: str  # the dotted key, by its name today
    before: Any = NO_VALUE  # what runs made under an older schema did (the key absent, or its old default)
    renamed_from: str | None = None  # the key's name before `since`
    removed: bool = False  # the option is gone since `since`


MIGRATIONS: tuple[Migration, ...] = (
    Migration(since=2, key="precision", before="fp32"),  # before `precision` existed every run was fp32
    # margin.beta only scaled the DPO-form Δim, which every selection metric z-scores or ranks: any value selected the
    # same pairs. The scale is trainer.beta's now (DPO's own implicit reward).
    Migration(since=3, key="margin.beta", removed=True),
    # trainer.bf16=true trained in bf16 under precision=fp32; precision=bf16 is the one switch now. A run whose stages
    # recorded true is refused, naming it (its later rounds cannot train as its first did).
    Migration(since=3, key="trainer.bf16", removed=True, before=False),
)


def config_schema(manifest: Mapping[str, Any]) -> int:
    return int(manifest.get("config_schema", 1))


def migrate_config(recorded: Mapping[str, Any], schema: int,
                   migrations: Iterable[Migration] | None = None) -> dict[str, Any]:
    """A manifest's flattened config as today's code reads it: renamed keys under today's names, and keys that
    did not exist yet at the value runs had before them."""
    flat = flatten(recorded)
    for m in MIGRATIONS if migrations is None else migrations:
        if schema >= m.since:
            continue
        if m.removed:
            if m.key in flat and (m.before is NO_VALUE or flat[m.key] == m.before):
                del flat[m.key]
            continue
        if m.renamed_from is not None and m.renamed_from in flat:
            flat.setdefault(m.key, flat.pop(m.renamed_from))
        if m.before is not NO_VALUE:
            flat.setdefault(m.key, m.before)
    return flat


def schema_default(key: str, schema: Any = None) -> Any:
    """The default of a dotted config key in the config dataclasses (MISSING when there is no such key)."""
    value: Any = (schema or Config)()
    for part in key.split("."):
        value = getattr(value, part, MISSING) if is_dataclass(value) else MISSING
    return MISSING if is_dataclass(value) else value


def diff_config(old: Mapping[str, Any], new: Mapping[str, Any], schema: Any = None, recorded_schema: int | None = None,
                migrations: Iterable[Migration] | None = None) -> list[str]:
    """Human-readable `key: old -> new` lines for the keys whose values differ. `old` is a manifest's config
    written under `recorded_schema` (default: today's, so nothing to migrate)."""
    a = migrate_config(old, CONFIG_SCHEMA if recorded_schema is None else recorded_schema, migrations)
    b = flatten(new)
    for key in set(b) - set(a):
        before = schema_default(key, schema)
        if before is not MISSING:
            a[key] = before
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_changes(manifest: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """What differs between a finished stage's recorded config (read under its own schema) and `config`."""
    return diff_config(manifest["config"], config, recorded_schema=config_schema(manifest))


def manifest_path(round_dir: Path, stage: str) -> Path:
    return round_dir / f"{stage}.done.json"


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def read_manifest(round_dir: Path, stage: str) -> dict[str, Any] | None:
    return read_json(manifest_path(round_dir, stage))


def build_manifest(stage: str, r: int, config: Mapping[str, Any], inputs: Mapping[str, str],
                   outputs: dict[str, dict[str, Any]], stats: Mapping[str, Any], started: float) -> dict[str, Any]:
    """A manifest: what ran (config, inputs), what it wrote (checksums), what it found (stats) and how long it took."""
    finished = time.time()
    return {
        "version": MANIFEST_VERSION,
        "config_schema": CONFIG_SCHEMA,
        "stage": stage,
        "round": r,
        "config": dict(config),
        "config_hash": fingerprint(config),
        "inputs": dict(inputs),
        "outputs": outputs,
        "fingerprint": fingerprint(outputs),
        "stats": dict(stats),
        "timings": {"started": started, "finished": finished, "seconds": round(finished - started, 3),
                    # the process's peak so far (Linux reports KiB)
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
    }


def outputs_present(base_dir: Path, manifest: Mapping[str, Any]) -> bool:
    """Cheap check (existence and size) that the files a manifest lists (relative to base_dir) are still there."""
    for rel, meta in manifest["outputs"].items():
        path = base_dir / rel
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            return False
    return True


_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → sha256, so each file is hashed once


def verify_outputs(base_dir: Path, manifest: Mapping[str, Any], owner: str) -> None:
    """Check every file a manifest lists against its sha256 before another stage reads it; a file changed or cut
    short after its stage finished is refused with the stage to redo."""
    for rel, meta in manifest["outputs"].items():
        path = base_dir / rel
        stat = path.stat() if path.is_file() else None
        key = (str(path), stat.st_size, stat.st_mtime_ns) if stat else None
        if stat is not None and stat.st_size == meta["bytes"] and key not in _verified:
            _verified[key] = sha256_file(path)
        if stat is None or _verified.get(key) != meta["sha256"]:
            stage = manifest["stage"]
            raise StageOutputDamaged(
                f"{path} does not match {owner} ({'missing' if stat is None else 'sha256 differs'}): it changed "
                f"after {stage} finished; redo it with force=[{stage}] (the stages after it follow)")


class StageOutputDamaged(SelfplayError):
    """A finished stage's output no longer matches the checksum in its manifest."""


def refuse_changed(what: str, changed: list[str], remedy: str) -> None:
    """Raise StageConfigChanged, `<what> with a different config:` then one `key: old -> new` line per change (a
    removed option's line says what replaced it) and the remedy; nothing when `changed` is empty."""
    if not changed:
        return
    lines = [f"{line}   ({REMOVED_OPTIONS[key]})" if (key := line.split(":", 1)[0]) in REMOVED_OPTIONS else line
             for line in changed]
    raise StageConfigChanged(f"{what} with a different config:\n  " + "\n  ".join(lines) + f"\n{remedy}")


@dataclass
class Decision:
    run: bool
    reason: str


def decide(round_dir: Path, stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], force: bool) -> Decision:
    """Whether a stage must run, and why. Raises StageConfigChanged when a finished stage's config changed."""
    manifest = read_manifest(round_dir, stage)
    if manifest is None:
        return Decision(True, "not run yet")
    if force:
        return Decision(True, "forced")
    refuse_changed(f"{round_dir.name}/{stage} already finished", config_changes(manifest, config),
                   "Re-run with the old values to continue this run, use another run_name=… for a new run, or add "
                   f"force=[{stage}] to redo this stage (stages that read its output are redone too).")
    if dict(manifest["inputs"]) != dict(inputs):
        return Decision(True, "its inputs changed (an upstream stage was redone)")
    if not outputs_present(round_dir, manifest):
        return Decision(True, "its outputs are missing or changed on disk")
    return Decision(False, "complete")


class StageWriter:
    """Owns a stage's temp directory; `commit()` renames its outputs into place and writes the manifest."""

    def __init__(self, round_dir: Path, stage: str, outputs: Iterable[str]):
        self.round_dir = round_dir
        self.stage = stage
        self.outputs = tuple(outputs)
        self.tmp = round_dir / f".tmp-{stage}"
        self.started = time.time()

    def __enter__(self) -> StageWriter:
        self.round_dir.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():  # left over from a killed attempt: nothing in it was complete
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        try:
            faults.point(faults.stage_label(self.round_dir.name, self.stage, "start"))
        except BaseException:  # a stop signal held here (selfplay/rundir/preemption.py): __exit__ will not run
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, config: Mapping[str, Any], inputs: Mapping[str, str], stats: Mapping[str, Any]) -> dict[str, Any]:
        missing = [name for name in self.outputs if not (self.tmp / name).exists()]
        if missing:
            raise RuntimeError(f"stage {self.stage} finished without writing {missing}")
        # The old manifest goes first: from here until the new one is written the stage counts as not done.
        manifest_path(self.round_dir, self.stage).unlink(missing_ok=True)
        for name in self.outputs:
            target = self.round_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(self.tmp / name, target)
            faults.point(faults.stage_label(self.round_dir.name, self.stage, "renamed"))  # outputs in place, no manifest
        outputs = checksum_outputs(self.round_dir, self.outputs)
        manifest = build_manifest(self.stage, int(self.round_dir.name.split("_")[-1]), config, inputs, outputs, stats,
                                  self.started)
        atomic.write_json(manifest_path(self.round_dir, self.stage), manifest)
        faults.point(faults.stage_label(self.round_dir.name, self.stage, "committed"))
        return manifest

"""Every shipped config composes against the schema; typos and impossible values fail naming the option."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from selfplay.config import REMOVED_OPTIONS, ConfigError, conf_dir, register, validate
from selfplay.rundir.manifest import flatten, schema_default

CONF = conf_dir()
register()


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_preset_composes_and_validates(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg.experiment == experiment
    validate(cfg)


def test_paper_selfplay_preset_does_what_it_says():
    """One pair per prompt (the best and the worst of N=5 at T=0.8, top-p 0.95), MAP with w=2.5 keeping 40%."""
    cfg = composed("experiment=paper_selfplay")
    assert (cfg.pair.strategy, cfg.sampler.n, cfg.sampler.temperature, cfg.sampler.top_p) == ("best_worst", 5, 0.8, 0.95)
    assert (cfg.selection.metric, cfg.selection.weight) == ("map", 2.5)
    assert cfg.selection.top_k / cfg.prompts.per_round == 0.4


@pytest.mark.parametrize("group", ["sampler", "selection", "trainer"])
def test_every_group_option_validates(group):
    for option in group_options(group):
        validate(composed(f"{group}={option}"))


def test_default_config_is_the_embedded_default():
    cfg = composed()
    validate(cfg)
    assert cfg.model.path == "embedded:smollm2-135m-instruct"
    assert cfg.reward.function == "selfplay.rewards.ifeval:reward"
    assert cfg.model.trust_remote_code is False
    assert (cfg.selection.metric, cfg.trainer.objective, cfg.sampler.backend) == ("map", "dpo", "vllm")


@pytest.mark.parametrize("chosen_by_user", [False, True])
def test_default_vllm_sampler_falls_back_to_hf_only_when_not_asked_for(monkeypatch, chosen_by_user):
    """Without vLLM installed, the default sampler becomes hf at hf's batch size; `sampler=vllm` asked for by name is
    an error naming the option. The stand-in below hides vLLM from the import system for this test only."""
    import importlib.util

    from selfplay.backends.samplers import resolve_backend
    from selfplay.errors import SelfplayError

    real_find_spec = importlib.util.find_spec

    def find_spec_without_vllm(name, *args):
        return None if name == "vllm" else real_find_spec(name, *args)

    cfg = composed()
    assert resolve_backend(cfg, chosen_by_user) == "vllm"  # installed here: nothing changes
    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_vllm)
    if chosen_by_user:
        with pytest.raises(SelfplayError, match="sampler=vllm"):
            resolve_backend(cfg, chosen_by_user)
    else:
        assert resolve_backend(cfg, chosen_by_user) == "hf"
        assert (cfg.sampler.backend, cfg.sampler.batch_size) == ("hf", composed("sampler=hf").sampler.batch_size)
        mine = composed("sampler.batch_size=5")  # a batch size the user gave is kept
        assert resolve_backend(mine, chosen_by_user, batch_size_by_user=True) == "hf" and mine.sampler.batch_size == 5


def test_unknown_key_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        composed("sampler.temprature=0.5")
    assert "temprature" in str(err.value) or "temprature" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "option"),
    [
        ("selection.metric=best", "selection.metric"),
        ("selection.weight=-1", "selection.weight"),
        ("sampler.n=1", "sampler.n"),
        ("selection.ratio=1.5", "selection.ratio"),
        ("trainer.objective=ppo", "trainer.objective"),
        ("force=[generat]", "force"),
    ],
)
def test_bad_values_fail_naming_the_option(override, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        validate(composed(override))


def test_cli_rejects_typo_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", f"output_root={tmp_path}", "trainer.betta=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "betta" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(Path(tmp_path).glob("*/round_*"))


def test_cli_bad_value_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", f"output_root={tmp_path}", "sampler.n=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sampler.n: needs ≥ 2 samples per prompt" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_selection_extras_validate_with_option_names():
    validate(composed("selection.weight=auto", "selection.signed=true", "selection.metric=real"))
    with pytest.raises(ConfigError, match="selection.weight"):
        validate(composed("selection.weight=heavy"))
    with pytest.raises(ConfigError, match="selection.weight"):
        validate(composed("selection.weight=-1"))
    with pytest.raises(ConfigError, match="pair.strategy"):
        validate(composed("pair.strategy=best_median"))
    # All pairs of n samples: up to n(n-1)/2 per prompt, so a top_k above prompts.per_round becomes possible.
    validate(composed("pair.strategy=all", "sampler.n=4", "prompts.per_round=10", "selection.top_k=60",
                      "selection.ratio=null"))
    with pytest.raises(ConfigError, match="selection.top_k"):
        validate(composed("pair.strategy=all", "sampler.n=4", "prompts.per_round=10", "selection.top_k=61",
                          "selection.ratio=null"))
    with pytest.raises(ConfigError, match="compare.arms"):
        validate(composed("experiment=compare", "compare.arms=[map,map-fast]"))
    with pytest.raises(ConfigError, match="compare.seeds"):
        validate(composed("experiment=compare", "compare.seeds=[1,1]"))


def test_an_option_declared_with_a_range_is_checked_with_no_other_code():
    """What a new option needs for its start-up check: its `option(…)` declaration beside the field, nothing else.
    Here a TrainerConfig grows a field, and validate() finds it by walking the dataclasses."""
    from dataclasses import dataclass, field

    from omegaconf import OmegaConf

    from selfplay.config import Config, TrainerConfig, option

    @dataclass
    class TrainerWithKnob(TrainerConfig):
        warmup_floor: float = option(0.25, ge=0, le=1)
        schedule_shape: str = option("flat", choices=("flat", "steep"))

    @dataclass
    class ConfigWithKnob(Config):
        trainer: TrainerWithKnob = field(default_factory=TrainerWithKnob)

    cfg = OmegaConf.structured(ConfigWithKnob)
    validate(cfg)
    cfg.trainer.warmup_floor = 1.5
    with pytest.raises(ConfigError, match=r"^trainer\.warmup_floor: must be in \[0, 1\], got 1\.5$"):
        validate(cfg)
    cfg.trainer.warmup_floor = 0.5
    cfg.trainer.schedule_shape = "wavy"
    with pytest.raises(ConfigError, match=r"^trainer\.schedule_shape: must be one of \('flat', 'steep'\), got 'wavy'$"):
        validate(cfg)


@pytest.mark.parametrize("override, message", [
    ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps: must be ≥ 1, got 0"),
    ("trainer.lr_scheduler_type=bogus", "trainer.lr_scheduler_type: must be one of ('linear', 'cosine'"),
    ("trainer.warmup_ratio=1.0", "trainer.warmup_ratio: must be in [0, 1), got 1.0"),
    ("eval.batch_size=0", "eval.batch_size: must be ≥ 1, got 0"),
    ("launcher.train.cpus_per_task=0", "launcher.train.cpus_per_task: must be ≥ 1, got 0"),
    ("ray.num_cpus=0", "ray.num_cpus: must be ≥ 1 or null, got 0"),
    ("trainer.lora_dropout=1", "trainer.lora_dropout: must be in [0, 1), got 1"),
    ("seed=-1", "seed: must be ≥ 0, got -1"),
])
def test_every_group_declares_its_ranges(override, message):
    with pytest.raises(ConfigError) as err:
        validate(composed(override))
    assert str(err.value).startswith(message)


def test_numeric_and_choice_options_all_declare_a_check():
    """Options added later are covered by construction: every int/float/choice-like field of every group declares
    its check with option(…), or is listed here with the reason it has none."""
    from dataclasses import fields, is_dataclass

    from selfplay.config import Config

    unchecked = {"sampler.n": "cross-field rule with its own message (≥ 2 to form a pair)",
                 "selection.weight": "a number ≥ 0 or 'auto', checked in validate()",
                 "selection.real_encoder": "a path", "trainer.lora_target_modules": "names or 'all-linear'"}
    missing = []

    def walk(schema, prefix=""):
        for f in fields(schema):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            elif (any(t in str(f.type) for t in ("int", "float")) and "list" not in str(f.type)
                  and "check" not in f.metadata and f"{prefix}{f.name}" not in unchecked):
                missing.append(f"{prefix}{f.name}")

    walk(Config)
    assert missing == []


# --- every command the documentation shows composes and validates ---------------------------------------------------

DOCS = [Path(__file__).resolve().parents[1] / "README.md", *sorted((CONF.parent / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"…|\$|<|^(R|i|n|NAME)$")  # round=R, shard=i, num_shards=n, model.path=…


def documented_commands():
    """(where, overrides) for every `selfplay run|stage|submit|select …` line of README.md and docs/*.md: in code
    blocks, continuation lines joined, comments cut. Placeholder values (`round=R`, `model.path=/models/…`) are
    left out, and so are Hydra's own options (`hydra/launcher=…`) and the generic `key=a,b`."""
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for n, line in enumerate(text.splitlines(), 1):
            for match in re.finditer(r"(?:^|[`$]\s*)(selfplay (?:run|stage \S+|submit|select \S+ \S+)(?: [^`#|]*)?)", line):
                try:
                    words = shlex.split(match.group(1))
                except ValueError:
                    continue
                overrides = [w for w in words[2:] if "=" in w and not w.startswith("-")
                             and not w.startswith(("hydra/", "hydra.", "key=")) and not PLACEHOLDER.search(w.split("=", 1)[1])]
                found.append((f"{doc.name}:{n}", words[1], tuple(overrides)))
    return found


def test_the_docs_show_commands_to_check():
    commands = documented_commands()
    assert len(commands) >= 30, commands  # the parser still finds the documented commands
    assert any(o == ("selection=real",) for _, _, o in commands)


@pytest.mark.parametrize(("where", "command", "overrides"), documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v) if isinstance(v, tuple) else None)
def test_every_documented_command_composes_and_validates(where, command, overrides):
    sweep = [o for o in overrides if "," in o.split("=", 1)[1] and not o.split("=", 1)[1].startswith("[")]
    fixed = [o for o in overrides if o not in sweep]
    for job in [fixed] + [fixed + [f"{o.split('=')[0]}={v}"] for o in sweep for v in o.split("=", 1)[1].split(",")]:
        try:
            validate(composed(*job), offline=command == "select")
        except (ConfigError, ConfigCompositionException, ConfigKeyError) as err:
            pytest.fail(f"{where}: `selfplay {command} {' '.join(job)}` does not compose: {err}")


# --- one source of defaults: the dataclasses in selfplay/config.py; a group's YAML holds only what differs ----------

PRESET_GROUPS = ("model", "sampler", "reward", "selection", "trainer", "launcher")


@pytest.mark.parametrize("group", PRESET_GROUPS)
def test_a_preset_sets_only_what_differs_from_the_declared_default(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        text = path.read_text()
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        assert text.startswith(("#", "\n")) or text == "", f"{path.name}: say what the preset is for"
        repeated = [k for k, v in flatten(values, f"{group}.").items() if v == schema_default(k)]
        assert not repeated, f"{path.name} repeats declared defaults (selfplay/config.py): {repeated}"


def test_the_composed_default_is_the_declared_default():
    """Every option of the config `selfplay run` composes is the dataclass default: the default presets
    (conf/config.yaml's defaults list) change nothing, so upgrades and the hf fallback, which read the dataclass
    defaults, read what runs."""
    differs = {k: (v, schema_default(k)) for k, v in flatten(OmegaConf.to_container(composed())).items()
               if v != schema_default(k)}
    assert not differs, differs


# Written in the docs on purpose though they are no option: typos shown being refused, and file names.
NOT_OPTIONS = {"sampler.temprature", "trainer.betta", "model.safetensors", "compare.json", "eval.json"}


def test_every_option_the_docs_name_exists():
    """`group.key` (or `group.key=value`) in README.md and docs/*.md, for the config's own groups, names an option
    or group of the composed config: a renamed or removed option cannot stay documented."""
    flat = flatten(OmegaConf.to_container(composed()))
    names = set(flat) | {".".join(k.split(".")[:i]) for k in flat for i in range(1, k.count(".") + 1)}
    groups = {k.split(".")[0] for k in flat}
    stale = [f"{doc.name}:{n} {m.group(1)}" for doc in DOCS for n, line in enumerate(doc.read_text().splitlines(), 1)
             for m in re.finditer(r"`([a-z_]+(?:\.[a-z_0-9]+)+)(?:=[^`]*)?`", line)
             if m.group(1).split(".")[0] in groups and m.group(1) not in names | NOT_OPTIONS
             # a removed option may be named only where the line says so
             and not (m.group(1) in REMOVED_OPTIONS and "removed" in line)]
    assert len(names) > 100 and not stale, stale


def test_the_runs_config_yaml_leaves_out_what_one_command_chose(tmp_path):
    """config.yaml describes the run, whichever command wrote it last: not `round=`, `shard=`, `force=` of a
    `selfplay stage` command."""
    from selfplay.config import PER_COMMAND_KEYS
    from selfplay.runner.pipeline import save_config

    save_config(composed("round=1", "shard=0", "num_shards=2", "force=[train]", "rounds=4"), tmp_path)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert not set(PER_COMMAND_KEYS) & set(saved) and saved.rounds == 4
    assert set(flatten(OmegaConf.to_container(composed()))) - set(flatten(OmegaConf.to_container(saved))) == set(
        PER_COMMAND_KEYS)


def test_the_group_table_in_the_docs_lists_exactly_the_presets_on_disk():
    """docs/configuration.md's table of config groups names, per group, every conf/<group>/*.yaml and nothing else."""
    rows = [line.split("|")[1:3] for line in (conf_dir().parent / "docs" / "configuration.md").read_text().splitlines()
            if re.match(r"\| `[a-z_]+` \|", line)]
    assert len(rows) >= 6
    for group_cell, options_cell in rows:
        group = group_cell.strip().strip("`")
        listed = set(re.findall(r"`([a-z_0-9]+)`", options_cell))
        on_disk = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
        assert listed == on_disk, f"docs/configuration.md lists {sorted(listed)} for {group}, conf/{group}/ has {sorted(on_disk)}"

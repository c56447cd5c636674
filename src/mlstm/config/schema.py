"""The config schema: every key of the `train` config, its type and its allowed values, in one place.

The types are dataclasses registered in Hydra's ConfigStore, config group `schema` (`schema/train`, `schema/cell`,
`schema/dataset`, `schema/trainer`, `schema/optim`, `schema/model`, `schema/logger`), when mlstm.config is imported.
`schema/train` heads configs/train.yaml's defaults list, so Hydra composes every config into it: the top level
(`seed`, `data_dir`) and the groups whose options all have the same keys (`trainer`, `model`) are typed while Hydra
composes, and OmegaConf itself refuses `seed=abc` or `trainer.max_steps=1.5`. (The entry is `optional`: a process
that has not imported mlstm.config still composes, and `validate` still checks every key.) The groups whose options
differ in their keys (`cell`: only mlstm has `form`; `optim`, `dataset`, `logger`) keep exactly the keys of the
chosen option in the composed config: a typed node would add the other options' keys, and a finished run is
recognised by its config.yaml comparing equal to the rerun's (mlstm.training.resume.FINISHED_KEYS). Their schema,
which holds the keys of every option, is applied to a copy: `validate` merges each group into its dataclass from the
ConfigStore (OmegaConf refuses a wrong type or an unknown key), then checks every value against its rule (`Rule`, in
the field's metadata) and the rules between keys.

`validate(cfg)` is the one place a `train` config is checked. The command line runs it before anything is written
(mlstm.cli.hooks: before Hydra makes the run directory, and for every job of a sweep before the first one starts);
the trainer runs it again for library callers. A bad value is one line naming the key, the value and what is allowed:

    optim.lr=nan must be a positive number (not inf or nan)
"""

import dataclasses
import difflib
import hashlib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mlstm.errors import UserError


# ------------------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """What a value must be: `allowed` completes "KEY=VALUE must be ...", `test` says whether a value is."""

    allowed: str
    test: Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(low: int) -> Rule:
    return Rule(f"an integer >= {low}", lambda v: _integer(v) and v >= low)


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices)


POSITIVE_INT = Rule("a positive integer", lambda v: _integer(v) and v > 0)
POSITIVE = Rule("a positive number (not inf or nan)", lambda v: _finite(v) and v > 0)
NON_NEGATIVE = Rule("a number >= 0 (not inf or nan)", lambda v: _finite(v) and v >= 0)
FINITE = Rule("a finite number", _finite)
OPEN_UNIT = Rule("a number in (0, 1)", lambda v: _finite(v) and 0 < v < 1)
HALF_OPEN_UNIT = Rule("a number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1)
UNIT_UPPER = Rule("a number in (0, 1]", lambda v: _finite(v) and 0 < v <= 1)
SEED = Rule("an integer in [0, 2**32 - 1]", lambda v: _integer(v) and 0 <= v < 2**32)
NOT_EMPTY = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
BETAS = Rule(
    "a pair of numbers in [0, 1)",
    lambda v: isinstance(v, list) and len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v),
)
SPLIT_SIZES = Rule(
    "three positive integers (train, valid, test)",
    lambda v: isinstance(v, list) and len(v) == 3 and all(_integer(s) and s > 0 for s in v),
)
SPLIT_FRACTIONS = Rule(
    "three positive numbers summing to 1 (train, valid, test)",
    lambda v: isinstance(v, list) and len(v) == 3 and all(_finite(f) and f > 0 for f in v) and abs(sum(v) - 1) <= 1e-6,
)
RESUME = Rule("one of true, false, auto", lambda v: v is True or v is False or v == "auto")
DEVICE = Rule("one of auto, cpu, cuda", lambda v: v in ("auto", "cpu", "cuda"))
CHECKSUM_ALGO = Rule(
    f"one of {', '.join(sorted(hashlib.algorithms_guaranteed))}",
    lambda v: isinstance(v, str) and v.lower() in hashlib.algorithms_guaranteed,
)


def key(default: Any = MISSING, rule: Rule | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field: its default (MISSING: required) and its rule (None: the type says it all)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


# ---------------------------------------------------------------------------------------------------------- schemas
@dataclass
class CellSchema:
    """`cell:` (configs/cell/): the keys of every cell; mlstm.cells.CellConfig documents what they do."""

    name: str = key("mlstm", one_of("mlstm", "lstm"))
    form: str | None = key(None, one_of("paper", "matlab", "seed"))  # mlstm only
    impl: str | None = key(None, one_of("fast", "reference", "cudnn", "loop"))  # checked against name below
    hidden_size: int = key(MISSING, POSITIVE_INT)
    use_peepholes: bool = key(False)
    cell_clip: float | None = key(None, POSITIVE)
    num_proj: int | None = key(None, POSITIVE_INT)
    proj_clip: float | None = key(None, POSITIVE)
    forget_bias: float | None = key(None, FINITE)
    forget_bias_init: float | None = key(None, FINITE)
    init: str = key("orthogonal", one_of("orthogonal", "matlab", "torch"))
    init_scale: float = key(1.0, POSITIVE)
    activation: str = key("tanh", one_of("tanh", "relu", "identity"))
    weight_norm: bool = key(False)
    dropout: float = key(0.0, HALF_OPEN_UNIT)
    seed_output: str | None = key(None, one_of("posted", "gated"))  # form=seed only


@dataclass
class ModelSchema:
    """`model:` (configs/train.yaml)."""

    embedding_size: int = key(0, at_least(0))  # 0 = one-hot input
    embed_dropout: float = key(0.0, HALF_OPEN_UNIT)
    num_layers: int = key(1, POSITIVE_INT)
    skip_connections: bool = key(False)


@dataclass
class DatasetSchema:
    """`dataset:` (configs/dataset/): enwik8/text8 downloads, a local file, or a Hugging Face dataset."""

    name: str = key(MISSING, one_of("enwik8", "text8", "file", "hf"))
    # enwik8 / text8
    url: str | None = key(None, NOT_EMPTY)
    archive_member: str | None = key(None, NOT_EMPTY)
    checksum_algo: str | None = key(None, CHECKSUM_ALGO)
    checksum: str | None = key(None, NOT_EMPTY)
    num_bytes: int | None = key(None, POSITIVE_INT)
    split_sizes: list[int] | None = key(None, SPLIT_SIZES)
    vocab_size: int | None = key(None, POSITIVE_INT)  # known in advance, for `make params`
    # file
    path: str | None = key(None, NOT_EMPTY)
    # file / hf
    split_fractions: list[float] | None = key(None, SPLIT_FRACTIONS)
    # hf
    hf_name: str | None = key(None, NOT_EMPTY)
    hf_config: str | None = key(None)
    hf_split: str | None = key(None, NOT_EMPTY)
    text_column: str | None = key(None, NOT_EMPTY)
    data_files: Any = key(None)
    hf_cache_dir: str | None = key(None)


@dataclass
class TrainerSchema:
    """`trainer:` (configs/trainer/): the loop, evaluation, checkpoints, divergence and stop rules."""

    device: str = key("auto", DEVICE)
    precision: str = key("fp32", one_of("fp32", "bf16", "fp16"))
    allow_tf32: bool = key(False)
    flush_denormal: bool = key(False)
    batch_size: int = key(MISSING, POSITIVE_INT)
    seq_len: int = key(MISSING, POSITIVE_INT)
    max_steps: int = key(MISSING, POSITIVE_INT)
    eval_every: int | None = key(None, POSITIVE_INT)
    eval_chars: int | None = key(None, POSITIVE_INT)  # null: the whole valid split
    eval_batch_size: int | None = key(None, POSITIVE_INT)  # null: batch_size
    test_chars: int | None = key(None, POSITIVE_INT)  # null: the whole test split
    test_at_end: bool = key(True)
    cold_start_streams: int | None = key(None, POSITIVE_INT)
    log_every: int | None = key(None, POSITIVE_INT)
    checkpoint_every: int | None = key(None, POSITIVE_INT)
    keep_checkpoints: int = key(2, POSITIVE_INT)
    max_time_s: float | None = key(None, POSITIVE)
    max_nonfinite_in_row: int = key(10, at_least(1))
    on_divergence: str = key("stop", one_of("stop", "reload", "end"))
    divergence_lr_factor: float = key(0.5, OPEN_UNIT)
    max_divergence_reloads: int = key(3, at_least(0))
    resume: Any = key("auto", RESUME)
    threads: int | None = key(None, POSITIVE_INT)
    progress: bool = key(True)
    # evaluations without improvement after the last rate reduction before the run stops (null: never)
    early_stop_patience: int | None = key(None, at_least(1))


@dataclass
class OptimSchema:
    """`optim:` (configs/optim/): the optimizer, its schedule and gradient clipping (mlstm.training.optim)."""

    name: str = key(MISSING, one_of("adam", "sgd", "rmsprop_norm"))
    lr: float = key(MISSING, POSITIVE)
    schedule: str = key("constant", one_of("constant", "linear", "plateau"))
    min_lr: float | None = key(None, NON_NEGATIVE)  # linear: the end of the line; plateau: the floor
    decay_steps: int | None = key(None, POSITIVE_INT)  # linear
    plateau_factor: float = key(0.5, OPEN_UNIT)  # plateau: the rate is multiplied by it ...
    plateau_patience: int = key(1, at_least(0))  # ... after more than this many evaluations without ...
    plateau_threshold: float = key(0.002, NON_NEGATIVE)  # ... an improvement of more than this (bpc, absolute)
    betas: list[float] | None = key(None, BETAS)  # adam
    eps: float | None = key(None, POSITIVE)
    weight_decay: float | None = key(None, NON_NEGATIVE)
    grad_clip: float | None = key(None, POSITIVE)  # null: no clipping
    momentum: float | None = key(None, NON_NEGATIVE)  # sgd
    threshold: float | None = key(None, POSITIVE)  # rmsprop_norm
    threshold_decay: float | None = key(None, UNIT_UPPER)
    min_threshold: float | None = key(None, NON_NEGATIVE)
    alpha: float | None = key(None, HALF_OPEN_UNIT)


@dataclass
class LoggerSchema:
    """`logger:` (configs/logger/): metrics.jsonl always; W&B when name=wandb."""

    name: str = key("none", one_of("none", "wandb"))
    mode: str | None = key(None, one_of("offline", "online", "disabled"))
    project: str | None = key(None)
    entity: str | None = key(None)
    group: str | None = key(None)
    tags: list[str] | None = key(None)
    init_timeout: float | None = key(None, POSITIVE)


@dataclass
class TrainSchema:
    """The whole `train` config. The groups typed at composition are dataclasses; the others (see the module's
    docstring) are `Any` here and checked by `validate`. The fields are in the order configs/train.yaml composes
    them (the order a run's config.yaml lists them in)."""

    cell: Any = key(None)
    dataset: Any = key(None)
    trainer: TrainerSchema = key(factory=TrainerSchema)
    optim: Any = key(None)
    logger: Any = key(None)
    seed: int = key(0, SEED)
    data_dir: str = key("data_cache", NOT_EMPTY)
    model: ModelSchema = key(factory=ModelSchema)


GROUPS: dict[str, type] = {
    "cell": CellSchema,
    "dataset": DatasetSchema,
    "trainer": TrainerSchema,
    "optim": OptimSchema,
    "model": ModelSchema,
    "logger": LoggerSchema,
}
REQUIRED_GROUPS = ("cell", "dataset", "trainer", "optim", "model")  # logger: optional (none = metrics.jsonl only)
TOP_LEVEL = ("seed", "data_dir")
LISTING = "python -m mlstm.cli.train --cfg job prints every key"


def register() -> None:
    """Store the schemas in Hydra's ConfigStore, config group `schema` (`schema/train`, `schema/cell`, ...)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=TrainSchema)
    for group, schema in GROUPS.items():
        store.store(group="schema", name=group, node=schema)


register()


# ------------------------------------------------------------------------------------------------------- validation
def validate(cfg) -> None:
    """Check every key of a composed `train` config (a DictConfig or a dict): types, values, rules between keys.
    Raises UserError with one line; OmegaConf's own errors (a bad interpolation) pass through."""
    for name in TOP_LEVEL:
        if name in cfg:
            value = _plain(cfg[name])
            field_ = _field(TrainSchema, name)
            if value is None or not _type_ok(field_, value):
                raise UserError(f"{name}={value!r} must be {describe(field_)}")
            _check_rule(name, field_, value)
    for group in GROUPS:
        node = cfg.get(group) if group in cfg else None
        if node is None and group not in REQUIRED_GROUPS:
            continue
        check_group(group, node)


def check_group(group: str, node) -> dict:
    """Check one group's node against its schema; returns its values, typed and with the schema's defaults."""
    schema = GROUPS[group]
    plain = _plain(node)
    if not isinstance(plain, dict):
        raise UserError(f"{group}={plain!r} must be a mapping of keys (config group {group}, e.g. {group}.KEY=...)")
    for name, value in plain.items():
        if value == "???":
            raise UserError(missing_line(f"{group}.{name}", plain))
    typed = _typed(group, schema, plain)
    for field_ in dataclasses.fields(schema):
        value = typed[field_.name]
        if value == "???":
            raise UserError(missing_line(f"{group}.{field_.name}", plain))
        if value is None:
            continue
        _check_rule(f"{group}.{field_.name}", field_, value, shown=plain.get(field_.name, value))
    RELATIONS[group](typed, plain)
    return typed


def _typed(group: str, schema: type, plain: dict) -> dict:
    """`plain` merged into the group's schema from the ConfigStore: OmegaConf refuses a wrong type or a key the
    schema lacks."""
    from hydra.core.config_store import ConfigStore

    base = ConfigStore.instance().load(f"schema/{group}.yaml").node
    try:
        merged = OmegaConf.merge(base, plain)  # a new config: the stored schema is left as it is
    except ConfigKeyError as error:
        name = getattr(error, "key", None) or "?"
        raise UserError(unknown_key_line(f"{group}.{name}")) from None
    except ValidationError as error:
        name = re.split(r"[.\[]", str(getattr(error, "full_key", "") or getattr(error, "key", "") or "?"))[0]
        value = plain.get(name, getattr(error, "value", None))
        raise UserError(f"{group}.{name}={value!r} must be {describe(_field(schema, name))}") from None
    return OmegaConf.to_container(merged, resolve=True)


def _check_rule(full_key: str, field_: dataclasses.Field, value: Any, shown: Any = None) -> None:
    """`value` (typed by the schema) against the field's rule; the message shows the value as given (`shown`)."""
    rule = field_.metadata.get("rule")
    if rule is not None and not rule.test(value):
        nullable = " or null" if _optional(field_.type) else ""
        raise UserError(f"{full_key}={value if shown is None else shown!r} must be {rule.allowed}{nullable}")


def _plain(node):
    """A config node as plain Python, interpolations resolved against the whole config it belongs to."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


# ------------------------------------------------------------------------------------------- rules between keys
def _cell(cell: dict, given: dict) -> None:
    impls = {"mlstm": ("fast", "reference"), "lstm": ("cudnn", "loop")}[cell["name"]]
    if cell["impl"] is not None and cell["impl"] not in impls:
        raise UserError(f"cell.impl={given['impl']!r} must be one of {', '.join(impls)} for cell.name={cell['name']}")
    if cell["name"] == "lstm" and cell["form"] is not None:
        raise UserError(f"cell.form={given['form']!r} must be null for cell.name=lstm (the forms are mlstm's)")
    if cell["seed_output"] is not None and (cell["name"] != "mlstm" or cell["form"] != "seed"):
        raise UserError(f"cell.seed_output={given['seed_output']!r} must be null unless cell.form=seed")
    if cell["proj_clip"] is not None and cell["num_proj"] is None:
        raise UserError(
            f"cell.proj_clip={given['proj_clip']!r} needs cell.num_proj (the clip applies to the "
            f"projected output); set cell.num_proj or leave cell.proj_clip null"
        )


def _dataset(dataset: dict, given: dict) -> None:
    name = dataset["name"]
    required = {"file": ("path", "/path/to/corpus.txt"), "hf": ("hf_name", "wikitext")}.get(name)
    if required and dataset[required[0]] in (None, ""):
        raise UserError(
            f"dataset.{required[0]} is required for dataset {name!r}; pass e.g. dataset.{required[0]}={required[1]}"
        )
    sizes, total = dataset["split_sizes"], dataset["num_bytes"]
    if name in ("enwik8", "text8") and sizes is not None and total is not None and sum(sizes) > total:
        raise UserError(
            f"dataset.split_sizes={given.get('split_sizes', sizes)} must sum to at most dataset.num_bytes={total}"
        )


def _trainer(trainer: dict, given: dict) -> None:
    pass  # every rule is one key's; the sizes against the data: mlstm.training.checks.check_eval_sizes


def _optim(optim: dict, given: dict) -> None:
    if optim["schedule"] == "linear":
        for name, example in (("min_lr", "7e-5"), ("decay_steps", "108000")):
            if optim[name] is None:
                raise UserError(f"optim.{name} is required by optim.schedule=linear; pass e.g. optim.{name}={example}")
    if optim["name"] == "rmsprop_norm":
        if optim["threshold"] is None:
            raise UserError("optim.threshold is required by optim.name=rmsprop_norm; pass e.g. optim.threshold=10")
        low = optim["min_threshold"]
        if low is not None and low > optim["threshold"]:
            raise UserError(
                f"optim.min_threshold={given.get('min_threshold')!r} must be at most "
                f"optim.threshold={given.get('threshold', optim['threshold'])!r}"
            )
        if optim["weight_decay"]:
            raise UserError("optim.weight_decay is not supported by optim=rmsprop_norm; set it to 0")


def _model(model: dict, given: dict) -> None:
    pass


def _logger(logger: dict, given: dict) -> None:
    pass


RELATIONS: dict[str, Callable[[dict, dict], None]] = {
    "cell": _cell,
    "dataset": _dataset,
    "trainer": _trainer,
    "optim": _optim,
    "model": _model,
    "logger": _logger,
}


# --------------------------------------------------------------------------------------------------------- messages
def describe(field_: dataclasses.Field | None) -> str:
    """What a field's type allows, in words: `an integer`, `a list of numbers or null`."""
    if field_ is None:
        return "a value of the right type"
    return _describe_type(field_.type)


def _describe_type(annotation) -> str:
    if _optional(annotation):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return f"{_describe_type(inner)} or null"
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"a list of {_PLURAL.get(item, 'values')}"
    return _WORDS.get(annotation, "any value")


def _optional(annotation) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _field(schema: type, name: str) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(schema) if f.name == name), None)


def _type_ok(field_: dataclasses.Field, value: Any) -> bool:
    hint = field_.type
    if hint is int:
        return _integer(value)
    if hint is str:
        return isinstance(value, str)
    return True


def field_of(full_key: str) -> dataclasses.Field | None:
    """The schema field of a dotted key (`trainer.max_steps`, `seed`), or None when the schema has no such key."""
    parts = full_key.split(".")
    if len(parts) == 1:
        return _field(TrainSchema, parts[0])
    schema = GROUPS.get(parts[0])
    return _field(schema, parts[1]) if schema is not None and len(parts) == 2 else None


def known_keys() -> list[str]:
    """Every dotted key of the schema: what an unknown key is compared with."""
    return [*TOP_LEVEL, *(f"{g}.{f.name}" for g, s in GROUPS.items() for f in dataclasses.fields(s))]


def unknown_key_line(full_key: str) -> str:
    """`unknown config key 'cell.hidden_sizee' (did you mean cell.hidden_size?); ...`"""
    close = difflib.get_close_matches(full_key, known_keys(), n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key '{full_key}'{hint}; check its spelling ({LISTING})"


def missing_line(full_key: str, given: dict | None = None) -> str:
    if full_key in ("dataset.path", "dataset.hf_name") and given is not None:
        example = "/path/to/corpus.txt" if full_key == "dataset.path" else "wikitext"
        return f"{full_key} is required for dataset {given.get('name')!r}; pass e.g. {full_key}={example}"
    return f"config value '{full_key}' is missing (???); pass it on the command line, e.g. {full_key}=..."

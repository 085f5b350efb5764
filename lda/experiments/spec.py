"""What an experiment is: prompts x conditions x n samples, scored by detectors.

`ExperimentSpec.from_dict` validates a JSON body and names the bad field in its `ValueError`
(`"detectors[1].pattern: bad regex ..."`), so the HTTP layer can answer 422 with it unchanged.

Samples are numbered condition-major, then prompt, then sample: index = (c * P + p) * n + s.
Condition-major because a condition decides the weights (an amplification merge, an adapter on or
off): a chunk, which is a contiguous index range, then touches one or two conditions and needs at
most that many merges, and the n samples of one prompt under one condition sit next to each other,
so the engine can prefill that prompt once for all of them. Sample i always uses `seed + i`, which
is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A chat prompt: ((role, content), ...); a plain prompt is a str.
Message = tuple[str, str]
Prompt = str | tuple[Message, ...]

ROLES = ("system", "user", "assistant")
STORE_MODES = ("all", "hits")
DETECTOR_TYPES = ("substring", "regex")
REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}
DEFAULT_CHUNK_SIZE = 64
# torch's manual_seed takes seeds below 2**64; staying below 2**63 keeps `seed + index` a valid
# signed 64-bit integer everywhere it travels (JSON readers, numpy).
MAX_SEED = 2**63 - 1


def regex_flags(letters: str, where: str = "flags") -> int:
    """The `re` flags for letters among i, m, s (`"is"` -> IGNORECASE | DOTALL)."""
    flags = 0
    for letter in letters:
        if letter not in REGEX_FLAGS:
            raise ValueError(f"{where}: unknown regex flag {letter!r} (use i, m or s)")
        flags |= REGEX_FLAGS[letter]
    return flags


def _alpha_text(alpha: float) -> str:
    return f"{alpha:g}"


@dataclass(frozen=True)
class Condition:
    """One way of decoding: LDA at `alpha`, optionally on an adapter or amplification config.

    Args:
        alpha: the LDA alpha (0 = the after model alone).
        adapter: adapter-mode LDA: after = base + this adapter, before = base (adapter off).
        amplification: a compiled config's `lora_name` or an inline config dict merged into the
            after model for this condition.
        control: the null control: decode before vs before, so alpha cannot change anything and
            any rate difference across alphas is noise (see `stats.control_flag`).
        steer: a steering reference `{adl, layer, position, strength, random_seed?}`: the after
            model decodes with an ADL job's vector added (the server resolves it).
    """

    alpha: float
    adapter: str | None = None
    amplification: str | Mapping[str, Any] | None = None
    control: bool = False
    steer: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        parts = ["control"] if self.control else []
        if self.adapter is not None:
            parts.append(f"adapter={self.adapter}")
        if isinstance(self.amplification, str):
            parts.append(f"amp={self.amplification}")
        elif self.amplification is not None:
            parts.append(f"amp={self.amplification.get('name', 'inline')}")
        if self.steer is not None:
            s = self.steer
            random = f" random={s['random_seed']}" if s.get("random_seed") is not None else ""
            parts.append(f"steer={s.get('adl')}@{s.get('layer')}:{s.get('position')}{random}")
            parts.append(f"strength={_alpha_text(float(s.get('strength', 1.0)))}")
        parts.append(f"alpha={_alpha_text(self.alpha)}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        amplification = self.amplification
        if amplification is not None and not isinstance(amplification, str):
            amplification = dict(amplification)
        return {
            "alpha": self.alpha,
            "adapter": self.adapter,
            "amplification": amplification,
            "control": self.control,
            "steer": dict(self.steer) if self.steer is not None else None,
        }


@dataclass(frozen=True)
class DetectorSpec:
    """A substring detector (any of `patterns`) or a regex detector (`pattern` with `flags`)."""

    name: str
    type: str
    patterns: tuple[str, ...] = ()
    case_sensitive: bool = False
    pattern: str = ""
    flags: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.type == "substring":
            return {
                "name": self.name,
                "type": self.type,
                "patterns": list(self.patterns),
                "case_sensitive": self.case_sensitive,
            }
        return {"name": self.name, "type": self.type, "pattern": self.pattern, "flags": self.flags}


@dataclass(frozen=True)
class SampleRef:
    """Where sample `index` sits in the grid, and the seed it decodes with."""

    index: int
    prompt_index: int
    condition_index: int
    sample_index: int
    seed: int


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated experiment. Build it with `from_dict`; `to_dict` round-trips it."""

    name: str
    prompts: tuple[Prompt, ...]
    conditions: tuple[Condition, ...]
    n: int
    seed: int
    detectors: tuple[DetectorSpec, ...]
    store: str = "all"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Decoding settings (max_new_tokens, temperature, ...) passed through to the engine untouched:
    # the HTTP layer validates them, the library only keeps them with the spec for reproduction.
    sampling: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.conditions) * len(self.prompts) * self.n

    @classmethod
    def from_dict(cls, body: Mapping[str, Any], max_samples: int | None = None) -> ExperimentSpec:
        """Validate a JSON body; `max_samples` is the server's MAX_EXPERIMENT_SAMPLES (None: no cap)."""
        if not isinstance(body, Mapping):
            raise ValueError(f"experiment: expected an object, got {type(body).__name__}")
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field (fields: {', '.join(cls.__dataclass_fields__)})")
        name = body.get("name", "experiment")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name: must be a non-empty string, got {name!r}")
        spec = cls(
            name=name,
            prompts=_parse_list(body, "prompts", parse_prompt),
            conditions=_parse_conditions(body),
            n=_int(body.get("n", 1), "n", lo=1),
            seed=_int(body.get("seed", 0), "seed", lo=0, hi=MAX_SEED),
            detectors=_parse_detectors(body),
            store=_choice(body.get("store", "all"), "store", STORE_MODES),
            chunk_size=_int(body.get("chunk_size", DEFAULT_CHUNK_SIZE), "chunk_size", lo=1),
            sampling=_mapping(body.get("sampling", {}), "sampling"),
        )
        if max_samples is not None and spec.total > max_samples:
            raise ValueError(
                f"n: {len(spec.conditions)} conditions x {len(spec.prompts)} prompts x n={spec.n} = "
                f"{spec.total} samples exceeds MAX_EXPERIMENT_SAMPLES={max_samples}"
            )
        if spec.seed + spec.total - 1 > MAX_SEED:
            raise ValueError(f"seed: seed + samples must stay below 2**63, got seed {spec.seed}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prompts": [prompt_to_json(p) for p in self.prompts],
            "conditions": [c.to_dict() for c in self.conditions],
            "n": self.n,
            "seed": self.seed,
            "detectors": [d.to_dict() for d in self.detectors],
            "store": self.store,
            "chunk_size": self.chunk_size,
            "sampling": dict(self.sampling),
        }


def sample_ref(spec: ExperimentSpec, index: int) -> SampleRef:
    """The grid position of sample `index` (condition-major, then prompt, then sample)."""
    if not 0 <= index < spec.total:
        raise ValueError(f"index: must be in [0, {spec.total}), got {index}")
    rest, sample_index = divmod(index, spec.n)
    condition_index, prompt_index = divmod(rest, len(spec.prompts))
    return SampleRef(index, prompt_index, condition_index, sample_index, spec.seed + index)


def samples(spec: ExperimentSpec, start: int = 0, stop: int | None = None) -> Iterator[SampleRef]:
    """Sample refs for indices [start, stop) in index order (the whole grid by default)."""
    stop = spec.total if stop is None else stop
    for index in range(start, stop):
        yield sample_ref(spec, index)


def chunks(spec: ExperimentSpec) -> list[range]:
    """Contiguous index ranges of `chunk_size` (the last one may be shorter)."""
    return [range(s, min(s + spec.chunk_size, spec.total)) for s in range(0, spec.total, spec.chunk_size)]


def prompt_to_json(prompt: Prompt) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        return prompt
    return [{"role": role, "content": content} for role, content in prompt]


def parse_prompt(value: Any, where: str) -> Prompt:
    """A prompt string, or chat messages `[{role, content}, ...]` with at least one user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: empty prompt")
        return value
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"{where}: expected a string or a non-empty list of messages, got {value!r:.80}")
    messages = []
    for i, message in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{at}: expected {{role, content}}, got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{at}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{at}.content: must be a string, got {content!r:.80}")
        messages.append((role, content))
    if not any(role == "user" and content.strip() for role, content in messages):
        raise ValueError(f"{where}: empty prompt (no non-empty user message)")
    return tuple(messages)


def parse_condition(value: Any, where: str) -> Condition:
    """A bare number (an alpha) or `{alpha, adapter?, amplification?, control?, steer?, strength?}`
    (`strength` beside `steer` sets the steering strength, so a sweep varies one number)."""
    if not isinstance(value, Mapping):
        value = {"alpha": value}
    unknown = sorted(set(value) - {"alpha", "adapter", "amplification", "control", "steer", "strength"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field")
    alpha = value.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"{where}.alpha: must be a finite number, got {alpha!r}")
    adapter = value.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise ValueError(f"{where}.adapter: must be a non-empty string, got {adapter!r}")
    amplification = value.get("amplification")
    if amplification is not None and not (
        (isinstance(amplification, str) and amplification) or isinstance(amplification, Mapping)
    ):
        raise ValueError(
            f"{where}.amplification: must be a lora_name or a config object, got {amplification!r:.80}"
        )
    control = value.get("control", False)
    if not isinstance(control, bool):
        raise ValueError(f"{where}.control: must be true or false, got {control!r}")
    if control and (adapter is not None or amplification is not None):
        # Before vs before has no adapter or merge to apply: such a label would claim an effect
        # that the engine never decodes.
        raise ValueError(
            f"{where}.control: a null control (before vs before) takes no adapter or amplification"
        )
    steer = _parse_steer(value, where)
    if steer is not None and (control or adapter is not None or amplification is not None):
        raise ValueError(f"{where}.steer: a steered condition takes no adapter, amplification or control")
    return Condition(float(alpha), adapter, amplification, control, steer)


def _parse_steer(value: Mapping[str, Any], where: str) -> Mapping[str, Any] | None:
    steer, strength = value.get("steer"), value.get("strength")
    if steer is None:
        if strength is not None:
            raise ValueError(f"{where}.strength: a strength needs a `steer` reference")
        return None
    if not isinstance(steer, Mapping):
        raise ValueError(f"{where}.steer: must be an object {{adl, layer, position, strength?}}, got {steer!r:.80}")
    steer = dict(steer)
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise ValueError(f"{where}.strength: must be a finite number, got {strength!r}")
        steer["strength"] = float(strength)
    return steer


def parse_detector(value: Any, where: str) -> DetectorSpec:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object, got {value!r:.80}")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.name: must be a non-empty string, got {name!r}")
    kind = _choice(value.get("type"), f"{where}.type", DETECTOR_TYPES)
    if kind == "substring":
        unknown = sorted(set(value) - {"name", "type", "patterns", "case_sensitive"})
        patterns = value.get("patterns")
        if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns:
            raise ValueError(
                f"{where}.patterns: at least one pattern (a list of strings), got {patterns!r:.80}"
            )
        for i, pattern in enumerate(patterns):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{where}.patterns[{i}]: must be a non-empty string, got {pattern!r}")
        case_sensitive = value.get("case_sensitive", False)
        if not isinstance(case_sensitive, bool):
            raise ValueError(f"{where}.case_sensitive: must be true or false, got {case_sensitive!r}")
        spec = DetectorSpec(name, kind, patterns=tuple(patterns), case_sensitive=case_sensitive)
    else:
        unknown = sorted(set(value) - {"name", "type", "pattern", "flags"})
        pattern, flags = value.get("pattern"), value.get("flags", "")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{where}.pattern: must be a non-empty string, got {pattern!r}")
        if not isinstance(flags, str):
            raise ValueError(f"{where}.flags: must be letters among i, m, s, got {flags!r}")
        compiled_flags = regex_flags(flags, f"{where}.flags")
        try:
            re.compile(pattern, compiled_flags)
        except re.error as exc:
            raise ValueError(f"{where}.pattern: bad regex {pattern!r}: {exc}") from None
        spec = DetectorSpec(name, kind, pattern=pattern, flags="".join(sorted(set(flags))))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field for a {kind} detector")
    return spec


def _parse_list(body: Mapping[str, Any], key: str, parse) -> tuple:
    values = body.get(key)
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{key}: must be a non-empty list, got {values!r:.80}")
    return tuple(parse(v, f"{key}[{i}]") for i, v in enumerate(values))


def _parse_conditions(body: Mapping[str, Any]) -> tuple[Condition, ...]:
    conditions = _parse_list(body, "conditions", parse_condition)
    seen: dict[str, int] = {}
    for i, condition in enumerate(conditions):
        if condition.label in seen:
            raise ValueError(
                f"conditions[{i}]: duplicate of conditions[{seen[condition.label]}] ({condition.label!r})"
            )
        seen[condition.label] = i
    return conditions


def _parse_detectors(body: Mapping[str, Any]) -> tuple[DetectorSpec, ...]:
    detectors = _parse_list(body, "detectors", parse_detector)
    names = [d.name for d in detectors]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"detectors[{i}].name: duplicate detector name {name!r}")
    return detectors


def _int(value: Any, where: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{where}: must be {bound}, got {value}")
    return value


def _choice(value: Any, where: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be an object, got {value!r:.80}")
    return dict(value)

"""The results file's JSON Schema, and the small validator that every reader runs.

SCHEMA below is the one source of truth. ``docs/results-schema.json`` is this dict as printed by
``python -m sparsek.bench.results_schema`` (a test keeps the two equal), so tools outside Python
can check a results file with any JSON Schema validator. Inside, ``validate`` interprets the
subset of JSON Schema 2020-12 that SCHEMA uses (type, const, enum, required, properties,
additionalProperties, items, minLength, minimum, anyOf, $ref into $defs), so reading a results
file needs no extra dependency.

The schema covers what the readers (report, tiers, compare, the gate) index into; extra keys are
allowed everywhere, so a writer may add fields without a version bump. JSON has no NaN or
infinity: the writer stores non-finite floats as the strings "nan", "inf" and "-inf", which
``#/$defs/number`` accepts and ``validate`` turns back into floats.
"""

from __future__ import annotations

import json
import math
import sys

# sparsek.bench.results re-exports these: the writer and the schema share one definition.
SCHEMA_NAME = "sparsek-bench"
SCHEMA_VERSION = 1
STATUSES = ("ok", "skipped", "failed", "oom", "timeout")
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

_NUMBER_REF = "#/$defs/number"


def _ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def _or_null(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_TEXT = {"type": ["string", "null"]}
_NUMBER = _ref("number")
_NUMBER_OR_NULL = _or_null(_NUMBER)

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sparsek-bench results file",
    "description": "Written by `sparsek-bench run --json` (sparsek/bench/results.py); read by "
                   "`sparsek-bench report/tiers/compare` and ci/gate.py, which all validate with this schema.",
    "type": "object",
    "required": ["schema", "schema_version", "run", "records"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"const": SCHEMA_VERSION},
        "run": _ref("run"),
        "records": {"type": "array", "items": _ref("record")},
        "tiers": {"type": "array", "items": {"type": "object"}},
    },
    "$defs": {
        "number": {
            "title": 'a number (or "nan", "inf", "-inf")',
            "anyOf": [{"type": "number"}, {"enum": list(NON_FINITE)}],
        },
        "run": {
            "type": "object",
            "description": "finished is null while the run is going on, and stays null in the checkpoint "
                           "of a run that was killed: such a file is partial.",
            "properties": {
                "started": _TEXT,
                "finished": _TEXT,
                "argv": _or_null({"type": "array", "items": {"type": "string"}}),
                "options": {"type": "object"},
                "timing": {
                    "type": "object",
                    "properties": {
                        "target_rel_iqr": _NUMBER_OR_NULL,
                        "min_samples": {"type": ["integer", "null"]},
                        "max_samples": {"type": ["integer", "null"]},
                        "max_time_s": _NUMBER_OR_NULL,
                    },
                },
                "device": {
                    "type": "object",
                    "properties": {
                        "name": _TEXT,
                        "driver": _TEXT,
                        "compute_capability": _TEXT,
                        "software": {"type": "object"},
                        "git": {
                            "type": "object",
                            "properties": {"commit": _TEXT, "dirty": {"type": ["boolean", "null"]}},
                        },
                    },
                },
                "peaks": {"type": "object", "additionalProperties": _ref("peak")},
                "cases": {"type": "object"},
                "json_path": _TEXT,
                "throttled": {"type": ["boolean", "null"]},
                "status_counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                "merged": {"type": "array", "items": {"type": "object"}},
            },
        },
        "peak": {
            "title": 'a measured peak {"matmul": {...}, "copy": {...}} or {"error": why}',
            "anyOf": [
                {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                {
                    "type": "object",
                    "required": ["matmul", "copy"],
                    "properties": {
                        "matmul": {
                            "type": "object",
                            "required": ["dtype", "n", "tflops"],
                            "properties": {"dtype": {"type": "string"}, "n": {"type": "integer"}, "tflops": _NUMBER},
                        },
                        "copy": {
                            "type": "object",
                            "required": ["bytes", "gbps"],
                            "properties": {"bytes": _NUMBER, "gbps": _NUMBER},
                        },
                    },
                },
            ],
        },
        "record": {
            "type": "object",
            "description": "One case x implementation. Only status ok records carry timing; the others say why in reason.",
            "required": ["case", "impl", "status"],
            "properties": {
                "case": {"type": "string", "minLength": 1},
                "impl": {"type": "string", "minLength": 1},
                "status": {"enum": list(STATUSES)},
                "reason": _TEXT,
                "family": _TEXT,
                "kind": _TEXT,
                "pattern": _TEXT,
                "description": _TEXT,
                "case_spec": {"type": ["object", "null"]},
                "notes": {"type": "array", "items": {"type": "string"}},
                "timing": _or_null(_ref("timing")),
                "metrics": _or_null(_ref("metrics")),
                "error": _or_null(_ref("error")),
                "memory": _or_null({"type": "object", "properties": {"peak_bytes": _NUMBER_OR_NULL}}),
                "clocks": _or_null({
                    "type": "object",
                    "properties": {
                        "throttled": {"type": ["boolean", "null"]},
                        "throttle_reasons": {"type": "array", "items": {"type": "string"}},
                    },
                }),
                "traceback": {"type": "array", "items": {"type": "string"}},
            },
        },
        "timing": {
            "type": "object",
            "description": "Seconds. samples are the raw timings in the order taken; the gate compares them.",
            "required": ["samples", "median", "iqr", "rel_iqr", "count"],
            "properties": {
                "samples": {"type": "array", "items": _NUMBER},
                "median": _NUMBER,
                "q1": _NUMBER,
                "q3": _NUMBER,
                "iqr": _NUMBER,
                "rel_iqr": _NUMBER,
                "mean": _NUMBER,
                "stdev": _NUMBER,
                "cv": _NUMBER,
                "min": _NUMBER,
                "max": _NUMBER,
                "count": {"type": "integer", "minimum": 0},
                "stop_reason": {"type": "string"},
                "mode": {"type": "string"},
                "timer": {"type": "string"},
            },
        },
        "metrics": {
            "type": "object",
            "properties": {
                **{name: _NUMBER_OR_NULL for name in (
                    "us_per_iter", "us_per_head", "tflops_effective", "tflops_dense_equivalent", "gbps",
                    "pct_peak_tflops", "pct_peak_gbps")},
                "implausible": {"type": "array", "items": {"type": "string"}},
            },
        },
        "error": {
            "type": "object",
            "properties": {
                "passed": {"type": ["boolean", "null"]},
                "max_abs": _NUMBER_OR_NULL,
                "max_rel": _NUMBER_OR_NULL,
                "extra": {"type": "object", "additionalProperties": {"type": "object",
                                                                      "properties": {"max_abs": _NUMBER_OR_NULL}}},
            },
        },
    },
}


class SchemaError(ValueError):
    """A document that does not match SCHEMA; ``where`` is the JSON path of the first problem."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where or 'top level'}: {problem}")
        self.where = where
        self.problem = problem


def validate(doc, schema: dict = SCHEMA):
    """Check ``doc`` against ``schema``; returns it with encoded non-finite numbers as floats
    (decoded in place: ``doc`` is the parsed file, owned by the caller).

    Raises SchemaError at the first problem, e.g. ``records[3]: missing 'case': expected a non-empty string``.
    """
    return _Validator(schema).check(doc, schema, "")


class _Validator:
    def __init__(self, root: dict):
        self.root = root

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            prefix = "#/$defs/"
            if not schema["$ref"].startswith(prefix):
                raise ValueError(f"results schema: unsupported $ref {schema['$ref']!r}")
            schema = self.root["$defs"][schema["$ref"][len(prefix):]]
        return schema

    def describe(self, schema: dict) -> str:
        """What a schema expects, in words: 'a string or null', 'one of "ok", "skipped", ...'."""
        schema = self.resolve(schema)
        if "title" in schema:
            return schema["title"]
        if "anyOf" in schema:
            return " or ".join(self.describe(branch) for branch in schema["anyOf"])
        if "const" in schema:
            return json.dumps(schema["const"])
        if "enum" in schema:
            return "one of " + ", ".join(json.dumps(option) for option in schema["enum"])
        types = schema.get("type")
        if types is None:
            return "any value"
        text = " or ".join(_TYPE_WORDS[t] for t in (types if isinstance(types, list) else [types]))
        return text.replace("a string", "a non-empty string") if schema.get("minLength") else text

    def admits_type(self, schema: dict, value) -> bool:
        types = self.resolve(schema).get("type")
        if types is None:
            return False
        return any(_is_type(value, t) for t in (types if isinstance(types, list) else [types]))

    def check(self, value, schema: dict, where: str):
        decode = schema.get("$ref") == _NUMBER_REF
        schema = self.resolve(schema)
        if "anyOf" in schema:
            errors = []
            for branch in schema["anyOf"]:
                try:
                    value = self.check(value, branch, where)
                    break
                except SchemaError as exc:
                    errors.append(exc)
            else:
                # The one branch of the value's own type, else the branch that got deepest into
                # the value, says the most; failing both, the general rule.
                typed = [e for b, e in zip(schema["anyOf"], errors) if self.admits_type(b, value)]
                if len(typed) == 1:
                    raise typed[0]
                deepest = max(errors, key=lambda e: e.where.count(".") + e.where.count("["))
                if deepest.where != where:
                    raise deepest
                raise SchemaError(where, f"expected {self.describe(schema)}, got {_show(value)}")
        if "const" in schema and not _same(value, schema["const"]):
            raise SchemaError(where, f"expected {json.dumps(schema['const'])}, got {_show(value)}")
        if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
            raise SchemaError(where, f"expected {self.describe(schema)}, got {_show(value)}")
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, t) for t in types):
                raise SchemaError(where, f"expected {self.describe(schema)}, got {_show(value)}")
        if isinstance(value, str) and len(value) < schema.get("minLength", 0):
            raise SchemaError(where, f"expected {self.describe(schema)}, got {_show(value)}")
        if _is_type(value, "number") and "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(where, f"expected a value >= {schema['minimum']}, got {_show(value)}")
        if isinstance(value, dict):
            self.check_object(value, schema, where)
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                value[i] = self.check(item, schema["items"], f"{where}[{i}]")
        if decode and isinstance(value, str):
            return NON_FINITE[value]
        return value

    def check_object(self, value: dict, schema: dict, where: str) -> None:
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaError(where, f"missing {key!r}: expected {self.describe(properties.get(key, {}))}")
        extra = schema.get("additionalProperties")
        for key in list(value):
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = self.check(value[key], sub, _join(where, key))


_TYPE_WORDS = {"object": "an object", "array": "an array", "string": "a string", "number": "a number",
               "integer": "an integer", "boolean": "true or false", "null": "null"}


def _is_type(value, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if name == "integer":
        return isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
    return True  # number (a bare NaN that Python's json module accepts is a number too)


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b or (_is_type(a, "number") and _is_type(b, "number") and a == b)


def _join(where: str, key: str) -> str:
    if not key.isidentifier():
        return f"{where}[{json.dumps(key)}]"
    return f"{where}.{key}" if where else key


def _show(value) -> str:
    kind = {dict: "an object", list: "an array", str: "a string", bool: "", type(None): ""}.get(type(value), "")
    text = json.dumps(value, default=str)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}".strip()


def main() -> int:
    """Print SCHEMA as JSON: the published copy in docs/results-schema.json."""
    sys.stdout.write(json.dumps(SCHEMA, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

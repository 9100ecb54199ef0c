"""Checking OpenLineage events offline: the spec's JSON schema, a minimal HTTP receiver, the chain.

The schema. No package on PyPI ships the OpenLineage JSON schema (OpenLineage.json and the facet
schemas): openlineage-python's classes only name it by URL (`_get_schema()`), and its generator
downloads it. So `validator()` rebuilds it from the package's own classes, which are generated
from that schema (openlineage/client/generated/*.py): each attrs class becomes an object schema
in `$defs` (a property per field, named as Serde writes it; required: the fields without a
default, and the producer/schemaURL pair BaseEvent and BaseFacet always fill in), each type
annotation a JSON type (`X | None` is optional, as Serde drops None; an Enum its values; a
`dict[str, F]` an object of F; an attrs class a $ref), and each field validator a format, read
from its source: `UUID(` -> uuid, `isoparse` -> date-time, `urlparse` -> uri. Facets accept more
properties than their class has, as the spec says. `validate(event)` checks a RunEvent against
that schema, then every facet in it against the schema of the class its `_schemaURL` names: a
generated facet class or one of lladav's (lladav/openlineage.py); a facet naming neither fails.
Formats are checked: uuid and date-time by jsonschema (rfc3339-validator is installed), uri by
`_is_uri` below (jsonschema's own needs a package we do not install).

`Receiver` is what a Marquez server is to the HTTP transport, minus the storage: it answers
POST /api/v1/lineage with 201 and keeps each body, parsed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
import threading
import types
import typing
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import attr
import jsonschema

ALWAYS_SET = {"producer", "schemaURL", "_producer", "_schemaURL"}
"""Fields with a default that __attrs_post_init__ always fills (BaseEvent, BaseFacet): the spec
requires them."""


def _is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return bool(urlsplit(value).scheme) and not any(c.isspace() for c in value)


def _format(validator: Any) -> str | None:
    if validator is None:
        return None
    source = inspect.getsource(validator)
    for marker, fmt in (("UUID(", "uuid"), ("isoparse", "date-time"), ("urlparse", "uri")):
        if marker in source:
            return fmt
    return None


def _hint(cls: type, field: str) -> Any:
    """A field's annotation, evaluated in the module of the class that declares it (the classes
    use `from __future__ import annotations`; typing.get_type_hints trips over their ClassVars
    imported only for type checkers)."""
    owner = next(c for c in cls.__mro__ if field in vars(c).get("__annotations__", {}))
    names = vars(sys.modules[owner.__module__])
    hint = owner.__annotations__[field]
    return (eval(hint, names) if isinstance(hint, str) else hint), names


def _is_facet(cls: type) -> bool:
    from openlineage.client.generated.base import BaseFacet

    return issubclass(cls, BaseFacet)


class _Schemas:
    """JSON schemas of attrs classes, sharing one $defs."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def ref(self, cls: type) -> dict[str, Any]:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key not in self.defs:
            self.defs[key] = {}  # placeholder: a class may refer to itself
            props = {}
            for f in attr.fields(cls):
                props[f.name] = self.of(*_hint(cls, f.name))
                if fmt := _format(f.validator):
                    props[f.name]["format"] = fmt
            required = [f.name for f in attr.fields(cls)
                        if f.default is attr.NOTHING or f.name in ALWAYS_SET]
            schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
            if _is_facet(cls):
                schema["additionalProperties"] = True
            self.defs[key] = schema
        return {"$ref": f"#/$defs/{key}"}

    def of(self, hint: Any, names: dict[str, Any]) -> dict[str, Any]:
        """The schema of a type annotation; `names`: its module's globals (forward references)."""
        if isinstance(hint, typing.ForwardRef):
            hint = eval(hint.__forward_arg__, names)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            options = [self.of(a, names) for a in args if a is not type(None)]
            return options[0] if len(options) == 1 else {"anyOf": options}
        if origin is typing.Literal:
            return {"enum": list(args)}
        if origin is list:
            return {"type": "array", "items": self.of(args[0], names)}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.of(args[1], names)}
        if hint is Any:
            return {}
        if inspect.isclass(hint) and issubclass(hint, Enum):
            return {"enum": [m.value for m in hint]}
        if inspect.isclass(hint) and attr.has(hint):
            return self.ref(hint)
        simple = {str: "string", bool: "boolean", int: "integer", float: "number"}
        if hint in simple:
            return {"type": simple[hint]}
        raise TypeError(f"no JSON type for {hint!r}")

    def schema(self, cls: type) -> dict[str, Any]:
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", **self.ref(cls),
                "$defs": self.defs}


def facet_classes() -> dict[str, type]:
    """_schemaURL (without its #fragment) -> facet class: openlineage-python's generated ones
    and lladav's."""
    import openlineage.client.generated as generated

    from lladav import openlineage as ours

    modules = [importlib.import_module(f"{generated.__name__}.{m.name}")
               for m in pkgutil.iter_modules(generated.__path__)] + [ours]
    found = {}
    for module in modules:
        for cls in vars(module).values():
            if inspect.isclass(cls) and attr.has(cls) and _is_facet(cls) \
                    and cls.__module__ == module.__name__:
                found[cls._get_schema().split("#")[0]] = cls
    return found


class Validator:
    """validate(event): the RunEvent schema, then each facet's own (module docstring)."""

    def __init__(self) -> None:
        from openlineage.client.event_v2 import RunEvent

        self.checker = jsonschema.FormatChecker()
        self.checker.checks("uri")(_is_uri)
        schemas = _Schemas()
        self.event = self._validator(schemas.schema(RunEvent))
        self.facets = {url: self._validator(_Schemas().schema(cls))
                       for url, cls in facet_classes().items()}

    def _validator(self, schema: dict[str, Any]) -> jsonschema.Validator:
        jsonschema.Draft202012Validator.check_schema(schema)
        return jsonschema.Draft202012Validator(schema, format_checker=self.checker)

    def validate(self, event: dict[str, Any]) -> None:
        self.event.validate(event)
        for where, facet in _facets(event):
            url = facet["_schemaURL"].split("#")[0]
            assert url in self.facets, f"{where}: no schema known for facet {url}"
            self.facets[url].validate(facet)


def _facets(event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = [(f"run.facets.{k}", v) for k, v in event["run"].get("facets", {}).items()]
    found += [(f"job.facets.{k}", v) for k, v in event["job"].get("facets", {}).items()]
    for side in ("inputs", "outputs"):
        for i, dataset in enumerate(event.get(side, [])):
            for group in ("facets", "inputFacets", "outputFacets"):
                found += [(f"{side}.{i}.{group}.{k}", v) for k, v in dataset.get(group, {}).items()]
    return found


# ---- reading a pipeline's events ---------------------------------------------------------------

def named(uri: str) -> tuple[str, str]:
    """(namespace, name) OpenLineage's naming gives an s3:// URI or a local path."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").rstrip("/").partition("/")
        return f"s3://{bucket}", key
    return "file", uri.rstrip("/")


def dataset_ids(datasets: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["namespace"], d["name"]) for d in datasets}


def by_job(events: list[dict[str, Any]], state: str) -> dict[str, dict[str, Any]]:
    """The last event of `state` of each job, by job name."""
    return {e["job"]["name"]: e for e in events if e["eventType"] == state}


def feeds(upstream: dict[str, Any], downstream: dict[str, Any]) -> set[tuple[str, str]]:
    """The datasets one run wrote that another read."""
    return dataset_ids(upstream["outputs"]) & dataset_ids(downstream["inputs"])


# ---- a minimal HTTP endpoint ---------------------------------------------------------------

class Receiver:
    """POST /api/v1/lineage on 127.0.0.1 (a free port), in a thread; `events` in arrival order."""

    PATH = "/api/v1/lineage"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != Receiver.PATH:
                    self.send_response(404)
                else:
                    receiver.events.append(json.loads(body))
                    self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

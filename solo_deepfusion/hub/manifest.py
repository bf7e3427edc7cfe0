"""The zoo manifest: ``zoo/manifest.yaml`` parsed into :class:`ZooEntry` objects.

>>> from solo_deepfusion.hub.manifest import list_models, load_manifest
>>> entries = load_manifest()  # $SOLO_DEEPFUSION_ZOO_MANIFEST, a checkout's, or the installed one
>>> sorted(entries) == list_models()
True

``zoo/`` of a checkout is the one source: a wheel carries a copy of its manifest, schema and
cards as ``solo_deepfusion/hub/zoo/`` (``setup.py`` copies them at build time), without the
weights. A file's relative URL (``files/<entry>/<file>``) is thus a checkout's first mirror;
``$SOLO_DEEPFUSION_ZOO_MIRRORS`` adds mirrors of that ``files/`` layout to every file
(``https://``, ``hf://<repo>@<revision>``, ``file:///``, loopback ``http://``), tried after the
manifest's own URLs.

Every load is validated against ``zoo/manifest.schema.json`` (with ``jsonschema``) and then
against rules a schema cannot state (URL policy, unique names, one file per role,
``.safetensors`` weights). Each problem is reported as
``entry '<name>' (models[i]): field 'files[0].sha256': ...`` in a :class:`ManifestError`.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jsonschema
import yaml

from .errors import ManifestError, UnknownModelError
from .urls import _check_rel_parts, parse_url

ENV_MANIFEST = "SOLO_DEEPFUSION_ZOO_MANIFEST"
ENV_MIRRORS = "SOLO_DEEPFUSION_ZOO_MIRRORS"
ROLES = ("backbone", "full", "args")
_ROLE_SUFFIX = {"backbone": ".safetensors", "full": ".safetensors", "args": ".json"}
# A checkout's zoo/ folder sits next to the package: <repo>/solo_deepfusion/hub/manifest.py.
REPO_ZOO_DIR = Path(__file__).resolve().parents[2] / "zoo"
# What an installed wheel carries instead (no weights): <site-packages>/solo_deepfusion/hub/zoo.
PACKAGED_ZOO_DIR = Path(__file__).resolve().parent / "zoo"

PathLike = str | os.PathLike[str]
SchemaError = tuple[tuple[Any, ...], str, str, Any]  # (path, message, keyword, detail)


@dataclass(frozen=True)
class Metric:
    """A measured number and how it was measured (``protocol['kind']``, ``k``, ``split`` ...)."""

    name: str
    value: float
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.protocol.get("kind", ""))


@dataclass(frozen=True)
class ZooFile:
    """One downloadable file of an entry; ``urls`` are mirrors tried in order."""

    role: str
    filename: str
    size: int
    sha256: str
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZooEntry:
    """One checkpoint of the zoo. Relative URLs resolve against ``manifest_dir``.

    >>> entry = ZooEntry(name="demo", files=(ZooFile("backbone", "b.safetensors", 3, "0" * 64),))
    >>> entry.file("backbone").filename
    'b.safetensors'
    """

    name: str
    files: tuple[ZooFile, ...]
    method: str = ""
    projector: dict[str, Any] = field(default_factory=dict)
    backbone: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    epochs: int = 0
    recipe: str = ""
    metrics: tuple[Metric, ...] = ()
    params: dict[str, int] = field(default_factory=dict)
    license: str = ""
    date: str = ""
    code_commit: str = ""
    manifest_dir: Path | None = field(default=None, compare=False, repr=False)

    def file(self, role: str = "backbone") -> ZooFile:
        """The file with this role; ``ValueError`` lists the roles the entry has."""
        for f in self.files:
            if f.role == role:
                return f
        have = ", ".join(f.role for f in self.files) or "none"
        raise ValueError(f"zoo entry {self.name!r} has no {role!r} file (it has: {have})")

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` of the backbone: its architecture and its preprocessing
        (``input_size``, ``mean``, ``std``, ``interpolation``, ``stem``; ``crop_pct`` 1)."""
        cfg: dict[str, Any] = {
            "architecture": self.backbone.get("name"),
            "tag": self.name,
            "num_classes": 0,
            "license": self.license,
        }
        p = self.preprocessing
        if p:
            cfg.update(
                input_size=tuple(p["input_size"]),
                mean=tuple(p["mean"]),
                std=tuple(p["std"]),
                interpolation=p["interpolation"],
                crop_pct=1.0,
                crop_mode="center",
                stem=p["stem"],
            )
        return cfg

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], manifest_dir: Path | None = None, mirrors: Sequence[str] = ()
    ) -> ZooEntry:
        """Build from one (already validated) manifest mapping; each base URL of ``mirrors``
        adds ``<base>/<name>/<filename>`` to every file's URLs, after the manifest's."""
        files = tuple(
            ZooFile(
                f["role"],
                f["filename"],
                int(f["size"]),
                f["sha256"],
                (*f["urls"], *(f"{base}/{d['name']}/{f['filename']}" for base in mirrors)),
            )
            for f in d["files"]
        )
        metrics = tuple(
            Metric(m["name"], float(m["value"]), dict(m["protocol"])) for m in d["metrics"]
        )
        return cls(
            name=d["name"],
            files=files,
            method=d["method"],
            projector=dict(d["projector"]),
            backbone=dict(d["backbone"]),
            preprocessing=dict(d.get("preprocessing", {})),
            dataset=d["dataset"],
            epochs=int(d["epochs"]),
            recipe=d["recipe"],
            metrics=metrics,
            params=dict(d["params"]),
            license=d["license"],
            date=d["date"],
            code_commit=d["code_commit"],
            manifest_dir=manifest_dir,
        )


# ----------------------------------------------------------------------------- locating files


def zoo_dir() -> Path:
    """A checkout's ``zoo/``, else the copy installed with the package (one-line
    :class:`ManifestError` when neither is there)."""
    for folder in (REPO_ZOO_DIR, PACKAGED_ZOO_DIR):
        if (folder / "manifest.schema.json").is_file():
            return folder
    raise ManifestError(
        f"no zoo manifest at {REPO_ZOO_DIR} (a checkout) nor {PACKAGED_ZOO_DIR} (an install); "
        f"reinstall solo-deepfusion, or set ${ENV_MANIFEST} to a manifest.yaml"
    )


def default_manifest_path() -> Path:
    """``$SOLO_DEEPFUSION_ZOO_MANIFEST`` if set, else :func:`zoo_dir`'s ``manifest.yaml``."""
    env = os.environ.get(ENV_MANIFEST)
    if env:
        return Path(env).expanduser()
    return zoo_dir() / "manifest.yaml"


def load_schema() -> dict[str, Any]:
    """The JSON schema ``manifest.schema.json`` of :func:`zoo_dir`."""
    with open(zoo_dir() / "manifest.schema.json", encoding="utf-8") as fh:
        return json.load(fh)


def env_mirrors() -> tuple[str, ...]:
    """The base URLs of ``$SOLO_DEEPFUSION_ZOO_MIRRORS`` (whitespace-separated), checked."""
    bases = tuple(base.rstrip("/") for base in os.environ.get(ENV_MIRRORS, "").split())
    for base in bases:
        try:
            kind = parse_url(f"{base}/x").kind
        except ValueError as err:
            raise ManifestError(f"${ENV_MIRRORS}: {err}") from None
        if kind == "relative":
            raise ManifestError(
                f"${ENV_MIRRORS}: {base!r} is relative; give https://, hf://, file:/// or "
                "loopback http:// base URLs"
            )
    return bases


# ----------------------------------------------------------------------------- validation


def _plain(obj: Any) -> Any:
    """YAML turns ``2026-01-31`` into a date; the schema wants the ISO string."""
    if isinstance(obj, _dt.date):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def schema_errors(doc: Any, schema: Mapping[str, Any] | None = None) -> Iterator[SchemaError]:
    """Structural errors of ``doc`` as ``(path, message, keyword, detail)``.

    ``required`` and ``additionalProperties`` errors are split into one per field.
    """
    schema = load_schema() if schema is None else schema
    cls = jsonschema.validators.validator_for(schema)
    for err in cls(schema).iter_errors(doc):
        path = tuple(err.absolute_path)
        if err.validator == "required" and isinstance(err.instance, Mapping):
            for key in err.validator_value:
                if key not in err.instance:
                    yield path, err.message, "required", key
        elif err.validator == "additionalProperties" and err.validator_value is False:
            known = err.schema.get("properties", {})
            for key in err.instance:
                if key not in known:
                    yield path, err.message, "additionalProperties", key
        else:
            detail = err.instance if err.validator == "type" else None
            yield path, err.message, str(err.validator), detail


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _where(doc: Any, path: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """``("entry 'x' (models[3])", rest_of_path)`` for paths inside an entry."""
    if len(path) >= 2 and path[0] == "models" and isinstance(path[1], int):
        i = path[1]
        entry = doc["models"][i]
        name = entry.get("name") if isinstance(entry, Mapping) else None
        label = f"entry {name!r} (models[{i}])" if isinstance(name, str) else f"models[{i}]"
        return label, path[2:]
    return "manifest", path


def _format(doc: Any, err: SchemaError) -> str:
    path, message, keyword, detail = err
    if keyword == "required":
        path, message = (*path, detail), "missing required field"
    elif keyword == "additionalProperties":
        path, message = (*path, detail), "unknown field"
    elif keyword == "type" and "string" in message and isinstance(detail, int | float | bool):
        message += " (quote it in the YAML)"
    where, rest = _where(doc, path)
    return f"{where}: field {_dotted(rest) or '<root>'!r}: {message}"


def _preprocessing_errors(m: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """An entry's preprocessing against itself and its backbone, as ``(field, message)``."""
    p = m.get("preprocessing")
    if p is None:
        return
    channels = p["input_size"][0]
    for key in ("mean", "std"):
        if len(p[key]) != channels:
            yield f"preprocessing.{key}", f"needs {channels} values (input_size[0])"
    if p["stem"] != m["backbone"]["stem"]:
        yield "preprocessing.stem", f"{p['stem']!r} differs from backbone.stem"


def _semantic_errors(models: list[Mapping[str, Any]]) -> Iterator[tuple[int, str, str]]:
    """Rules beyond the schema, as ``(index, field, message)``."""
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        name = m["name"]
        if name in seen:
            yield i, "name", f"duplicate name, already used by models[{seen[name]}]"
        seen.setdefault(name, i)
        try:
            _check_rel_parts(m["recipe"], "recipe")
        except ValueError as e:
            yield i, "recipe", str(e)
        yield from ((i, f, msg) for f, msg in _preprocessing_errors(m))
        for j, metric in enumerate(m["metrics"]):
            if metric["protocol"]["kind"] == "knn" and "k" not in metric["protocol"]:
                yield i, f"metrics[{j}].protocol.k", "knn metrics must state k"
        roles: set[str] = set()
        names: set[str] = set()
        for j, f in enumerate(m["files"]):
            if f["role"] in roles:
                yield i, f"files[{j}].role", f"duplicate role {f['role']!r}"
            if f["filename"] in names:
                yield i, f"files[{j}].filename", f"duplicate filename {f['filename']!r}"
            roles.add(f["role"])
            names.add(f["filename"])
            suffix = _ROLE_SUFFIX[f["role"]]
            if not f["filename"].endswith(suffix):
                yield i, f"files[{j}].filename", f"a {f['role']!r} file must end in {suffix}"
            for k, url in enumerate(f["urls"]):
                try:
                    parse_url(url)
                except ValueError as e:
                    yield i, f"files[{j}].urls[{k}]", str(e)


def validate_manifest(doc: Any, source: str = "manifest") -> None:
    """Raise :class:`ManifestError` listing every problem of a parsed manifest document."""
    doc = _plain(doc)
    if not isinstance(doc, Mapping):
        raise ManifestError(f"{source}: expected a mapping with 'schema_version' and 'models'")
    problems = sorted({_format(doc, e) for e in schema_errors(doc)})
    if not problems:
        for i, fld, msg in _semantic_errors(doc["models"]):
            where, _ = _where(doc, ("models", i))
            problems.append(f"{where}: field {fld!r}: {msg}")
    if problems:
        raise ManifestError(f"invalid zoo manifest {source}:", problems)


# ----------------------------------------------------------------------------- public API


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases: nested ones expand exponentially."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def read_yaml(stream: str | IO[str]) -> Any:
    """YAML as ``yaml.safe_load`` reads it, aliases refused (``yaml.YAMLError``)."""
    return yaml.load(stream, Loader=_NoAliasLoader)


def load_manifest(path: PathLike | None = None) -> dict[str, ZooEntry]:
    """Parse and validate a manifest; ``{name: entry}`` in manifest order.

    ``path`` defaults to ``$SOLO_DEEPFUSION_ZOO_MANIFEST``, a checkout's ``zoo/manifest.yaml`` or
    the installed copy; ``$SOLO_DEEPFUSION_ZOO_MIRRORS`` adds mirrors to every file.
    """
    p = Path(path).expanduser() if path is not None else default_manifest_path()
    if not p.is_file():
        hint = f" (from ${ENV_MANIFEST})" if path is None and os.environ.get(ENV_MANIFEST) else ""
        raise ManifestError(f"zoo manifest not found: {p}{hint}")
    try:
        with open(p, encoding="utf-8") as fh:
            doc = _plain(read_yaml(fh))
    except UnicodeDecodeError as e:
        raise ManifestError(f"zoo manifest {p} is not UTF-8 text: {e}") from e
    except yaml.YAMLError as e:
        raise ManifestError(f"zoo manifest {p} is not valid YAML: {e}") from e
    validate_manifest(doc, str(p))
    base, mirrors = p.resolve().parent, env_mirrors()
    return {m["name"]: ZooEntry.from_dict(m, base, mirrors) for m in doc["models"]}


def list_models(manifest: PathLike | None = None) -> list[str]:
    """Sorted entry names. ``list_models()`` → ``['simclr-deepfusion-r18-cifar10-cpu', ...]``."""
    return sorted(load_manifest(manifest))


def get_entry(name: str, manifest: PathLike | None = None) -> ZooEntry:
    """The entry called ``name``; :class:`UnknownModelError` suggests close names."""
    entries = load_manifest(manifest)
    try:
        return entries[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(entries), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        known = (
            f" ({len(entries)} entries; see list_models())" if entries else " (the zoo is empty)"
        )
        raise UnknownModelError(f"no zoo entry named {name!r}{hint}{known}") from None

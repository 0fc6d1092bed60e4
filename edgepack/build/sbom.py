"""The bundle's ML-BOM: ``sbom.cdx.json``, CycloneDX 1.6, written with cyclonedx-python-lib.

What it lists:

* ``metadata.component``: the bundle (an application), ``metadata.tools``: edgepack, the
  converter and the quantizer with their versions;
* the model as a ``machine-learning-model`` component: the bundle's model file(s) with sha256,
  the card's licence, a ``modelCard`` (task, architecture, datasets named in the card,
  quantization, the validation figures as performance metrics) and a ``pedigree`` whose ancestor
  is the source model (``pkg:huggingface/ORG/NAME@COMMIT``, each source file with its sha256)
  and whose notes say what was changed;
* every software component that runs on the device: the runtime pack's wheels (name, version,
  sha256) when the bundle has a ``runtime/``, else edgepack's device requirements for this
  bundle's engine (name and version range, as pip would resolve them).

cyclonedx-python-lib (11.x) models every part of this except ``modelCard``, which it leaves
out (the property is commented out in ``cyclonedx/model/component.py``), so the card is added
to the serialized JSON and the whole document is checked against the 1.6 JSON schema the library
ships before it is written.

Same inputs give the same bytes: the serial number is a UUIDv5 of the bundle's content and
``metadata.timestamp`` is only written when ``SOURCE_DATE_EPOCH`` is set (the reproducible-builds
convention, https://reproducible-builds.org/specs/source-date-epoch/), from that value.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.build.runtime_pack import DEVICE_EXTRAS
from edgepack.errors import BuildError
from edgepack.manifest import SBOM_NAME

__all__ = ["SBOM_NAME", "require_sbom_writer", "sbom_dict", "write_sbom"]

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
_NS = uuid.UUID("6f1d3f5e-3c1b-5d55-9a0e-6564676570ab")  # edgepack's UUIDv5 namespace


def require_sbom_writer() -> None:
    """Raise BuildError unless cyclonedx-python-lib can be imported: called before a build
    starts, so a missing library is reported before minutes of conversion, not after."""
    try:
        import cyclonedx.output.json  # noqa: F401
        import packageurl  # noqa: F401
    except ImportError as e:
        raise BuildError(
            f"cannot write the bundle's ML-BOM: {e.name or 'cyclonedx-python-lib'} is not "
            "installed",
            hint="install the build extra again: pip install 'edgepack[build]' (it brings "
                 "cyclonedx-python-lib>=11,<12); scripts/setup does it for a checkout") from e


def _purl(kind: str, name: str, version: str | None, namespace: str | None = None) -> Any:
    from packageurl import PackageURL

    return PackageURL(type=kind, namespace=namespace, name=name, version=version)


def _licenses(card: Mapping[str, Any]) -> list[Any]:
    from cyclonedx.model import XsUri
    from cyclonedx.model.license import DisjunctiveLicense

    try:  # 11.x moved the factory; the old location warns
        from cyclonedx.contrib.license.factories import LicenseFactory
    except ImportError:  # pragma: no cover - older 11.x
        from cyclonedx.factory.license import LicenseFactory

    lic = card.get("license")
    if not lic:
        return []
    if lic == "other":
        url = XsUri(card["license_link"]) if card.get("license_link") else None
        return [DisjunctiveLicense(name=card.get("license_name") or "other", url=url)]
    # An SPDX id (the hub's ids are SPDX ids in lower case) becomes {"id"}; else a name.
    return [LicenseFactory().make_from_string(str(lic))]


def _device_requirements(fmt: str) -> list[tuple[str, str]]:
    """(name, specifier) of what a device installs for a bundle of ``fmt``, from edgepack's
    own package metadata, so the list cannot drift from pyproject.toml."""
    from packaging.requirements import Requirement

    extras = DEVICE_EXTRAS.get(fmt, ("serve", "agent"))
    out: dict[str, str] = {"edgepack": f"=={__version__}"}
    for text in importlib_metadata.requires("edgepack") or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            out.setdefault(req.name.lower(), str(req.specifier))
    return sorted(out.items())


def _runtime_wheels(files: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(name, version, path, sha256) of every wheel in the bundle's runtime pack."""
    wheels = []
    for f in files:
        path = str(f["path"])
        if path.startswith("runtime/") and path.endswith(".whl"):
            m = _WHEEL.match(path.rsplit("/", 1)[-1])
            if m:
                wheels.append((m["name"].replace("_", "-").lower(), m["version"], path,
                               str(f["sha256"])))
    return sorted(wheels)


def sbom_dict(spec: Any, files: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ML-BOM of a bundle (a ``BundleSpec``) whose files are ``files`` ({path, sha256,
    size}); schema-valid CycloneDX 1.6 JSON as a dict. Raises BuildError if the library's
    own schema check fails (a bug)."""
    from cyclonedx.model import ExternalReference, ExternalReferenceType, HashType, Property, XsUri
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentScope, ComponentType, Pedigree
    from cyclonedx.output.json import JsonV1Dot6

    source, card = dict(spec.source), dict(spec.card)
    plan_model = dict(spec.plan.get("model") or {})
    model_files = [f for f in files if str(f["path"]).startswith("model/")]
    repo_id, rev = source.get("repo_id"), source.get("revision")
    src_files = [Component(type=ComponentType.FILE, name=path, bom_ref=f"source-file:{path}",
                           hashes=[HashType.from_hashlib_alg("sha256", digest)])
                 for path, digest in sorted((source.get("files") or {}).items())]
    org, _, short = (repo_id or "").partition("/")
    ancestor = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, bom_ref="source-model",
        name=short or str(source.get("ref")), group=org or None,
        version=rev or source.get("content_digest"),
        purl=_purl("huggingface", short, rev, org.lower()) if repo_id and rev else None,
        licenses=_licenses(card), components=src_files,
        properties=[Property(name="edgepack:requested_revision",
                             value=str(source.get("requested_revision")))]
        if source.get("requested_revision") else [],
    )
    derivation = dict(spec.derivation)
    pedigree = Pedigree(ancestors=[ancestor],
                        notes="; ".join(derivation.get("changes") or []) or None)
    props = [Property(name="edgepack:format", value=spec.model_format),
             Property(name="edgepack:quantization", value=spec.quant),
             Property(name="edgepack:kind", value=spec.model_kind)]
    if card.get("gated"):
        props.append(Property(name="edgepack:gated", value=str(card["gated"])))
    refs = []
    if card.get("license_link"):
        refs.append(ExternalReference(type=ExternalReferenceType.LICENSE,
                                      url=XsUri(str(card["license_link"]))))
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, bom_ref="model", name=spec.model_name,
        version=f"{spec.model_format}-{spec.quant}",
        hashes=[HashType.from_hashlib_alg("sha256", str(f["sha256"])) for f in model_files[:1]],
        licenses=_licenses(card), pedigree=pedigree, properties=props,
        external_references=refs,
        components=[Component(type=ComponentType.FILE, name=str(f["path"]),
                              bom_ref=f"bundle-file:{f['path']}",
                              hashes=[HashType.from_hashlib_alg("sha256", str(f["sha256"]))])
                    for f in model_files[1:]],
    )
    runtime: list[Component] = []
    wheels = _runtime_wheels(files)
    if wheels:
        for name, version, path, digest in wheels:
            runtime.append(Component(
                type=ComponentType.LIBRARY, bom_ref=f"runtime:{name}", name=name,
                version=version, scope=ComponentScope.REQUIRED, purl=_purl("pypi", name, version),
                hashes=[HashType.from_hashlib_alg("sha256", digest)],
                properties=[Property(name="edgepack:bundle_path", value=path)]))
    else:
        for name, specifier in _device_requirements(spec.model_format):
            exact = specifier[2:] if specifier.startswith("==") else None
            runtime.append(Component(
                type=ComponentType.LIBRARY, bom_ref=f"runtime:{name}", name=name, version=exact,
                scope=ComponentScope.REQUIRED,
                purl=_purl("pypi", name, exact),
                properties=[Property(name="edgepack:version_range", value=specifier or "any")]))
    bundle = Component(type=ComponentType.APPLICATION, bom_ref="bundle", name=spec.name,
                       version=str(spec.version),
                       properties=[Property(name="edgepack:device_profile",
                                            value=str(spec.device.get("profile_id")))])
    bom = Bom(components=[model, *runtime])
    bom.metadata.component = bundle
    bom.metadata.tools.components.update(_tools(spec))
    bom.serial_number = _serial(spec, files)
    bom.register_dependency(bundle, [model, *runtime])
    text = JsonV1Dot6(bom).output_as_string()
    doc = json.loads(text)
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        doc["metadata"]["timestamp"] = datetime.fromtimestamp(int(epoch), timezone.utc
                                                              ).strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        doc["metadata"].pop("timestamp", None)
    for comp in doc["components"]:
        if comp.get("bom-ref") == "model":
            comp["modelCard"] = _model_card(spec, card, plan_model)
    _validate(doc)
    return doc


def _tools(spec: Any) -> list[Any]:
    from cyclonedx.model.component import Component, ComponentType

    tools = [Component(type=ComponentType.APPLICATION, name="edgepack", version=__version__,
                       bom_ref="tool:edgepack")]
    conv = dict(spec.converter)
    if conv.get("name"):
        tools.append(Component(type=ComponentType.APPLICATION, name=str(conv["name"]),
                               version=str(conv.get("version")), bom_ref="tool:converter",
                               description="converter"))
    engine = dict(spec.engine)
    if engine.get("built_with"):
        tools.append(Component(type=ComponentType.LIBRARY,
                               name=str(engine.get("package") or engine.get("name")),
                               version=str(engine["built_with"]), bom_ref="tool:quantizer",
                               description="quantizer and validation engine"))
    return tools


def _serial(spec: Any, files: Sequence[Mapping[str, Any]]) -> Any:
    """A serial number that identifies this content: UUIDv5 of the bundle's name, version and
    file digests (CycloneDX asks for a unique urn:uuid per BOM; equal content, equal BOM)."""
    basis = json.dumps([spec.name, str(spec.version),
                        sorted((str(f["path"]), str(f["sha256"])) for f in files)])
    return uuid.uuid5(_NS, basis)


def _model_card(spec: Any, card: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, Any]:
    task = card.get("pipeline_tag") or {"chat": "text-generation",
                                        "completion": "text-generation",
                                        "embedding": "feature-extraction"}.get(spec.model_kind)
    params: dict[str, Any] = {"task": task} if task else {}
    if facts.get("model_type"):
        params["architectureFamily"] = str(facts["model_type"])
    if facts.get("architecture"):
        params["modelArchitecture"] = str(facts["architecture"])
    if card.get("datasets"):
        params["datasets"] = [{"type": "dataset", "name": str(d)} for d in card["datasets"]]
    params["inputs"] = [{"format": "string"}]
    params["outputs"] = [{"format": "vector" if spec.model_kind == "embedding" else "string"}]
    val = dict(spec.validation)
    metrics = []
    if val.get("metric") is not None:
        metrics.append({"type": str(val["metric"]), "value": str(val.get("value")),
                        "slice": f"against {val.get('reference') or 'the unquantized model'}"})
        metrics.append({"type": f"{val['metric']} threshold", "value": str(val.get("threshold"))})
    for g in (val.get("details") or {}).get("golden") or []:
        if isinstance(g, dict) and "prompt" in g:
            metrics.append({"type": "golden prompt passed", "value": str(g.get("passed")),
                            "slice": str(g["prompt"])})
    out: dict[str, Any] = {"modelParameters": params}
    if metrics:
        out["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    props = [{"name": "edgepack:quantization", "value": spec.quant}]
    if facts.get("n_params"):
        props.append({"name": "edgepack:parameters", "value": str(facts["n_params"])})
    if card.get("language"):
        props.append({"name": "edgepack:language", "value": ",".join(card["language"])})
    if card.get("base_model"):
        props.append({"name": "edgepack:base_model", "value": ",".join(card["base_model"])})
    out["properties"] = props
    return out


def _validate(doc: Mapping[str, Any]) -> None:
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError:  # the [validation] extra (jsonschema) is a test dependency
        return
    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc))
    except ImportError:
        return
    if error is not None:
        raise BuildError(f"the bundle's ML-BOM does not match the CycloneDX 1.6 schema: {error}",
                         hint="this is a bug in edgepack; report it with EDGEPACK_DEBUG=1")


def write_sbom(spec: Any) -> Any:
    """A ``write_bundle`` document writer that adds ``sbom.cdx.json`` for ``spec``."""

    def write(tmp: Path, files: list[dict[str, Any]]) -> list[str]:
        doc = sbom_dict(spec, files)
        (tmp / SBOM_NAME).write_bytes((json.dumps(doc, indent=2, sort_keys=True,
                                                  ensure_ascii=False) + "\n").encode())
        return [SBOM_NAME]

    return write

"""How a fitted scaler or model is stored: skops, which runs no code when it loads a file.

A pickle (joblib's format) runs whatever its bytes say when it is loaded, so a bundle whose
checksums were recomputed by an attacker could run a command in ``predict``, ``serve`` or
``registry import``. skops stores the same objects as JSON plus numpy arrays and refuses, before
building anything, every type that is not on its list of trusted types: scikit-learn's own
estimators (skops' defaults) and the one extra type the tree families need
(:data:`TRUSTED_TYPES`). After loading, the object must also be one of :data:`EXPECTED_TYPES`.

The stored arrays are the fitted arrays, bit for bit: predictions after a round trip equal the
original estimator's exactly (a test checks 10^5 rows for every family).
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

# Beyond skops' defaults (scikit-learn's estimators, numpy arrays and dtypes): the shared node
# storage of DecisionTree*, RandomForest*, ExtraTrees* and GradientBoosting*.
TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)
# What a bundle's model and scaler files may hold once loaded.
EXPECTED_TYPES = {
    "model": (
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.ensemble._forest.ExtraTreesClassifier",
        "sklearn.ensemble._gb.GradientBoostingClassifier",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.tree._classes.DecisionTreeClassifier",
    ),
    "scaler": ("sklearn.preprocessing._data.StandardScaler",),
}
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
_MEMORY_ID = re.compile(r"^([0-9]+)\.npy$")
_IDS_IN_SCHEMA = re.compile(rb'"__id__": ([0-9]+)|"file": "([0-9]+)\.npy"')


class ModelFormatError(ValueError):
    """Bytes that are not a trusted skops file of the expected kind; the message says which."""


def dumps(obj: Any) -> bytes:
    """``obj`` as skops bytes, the same bytes for the same fitted object in any process."""
    import skops.io

    return _canonical(skops.io.dumps(obj))


def loads(data: bytes, kind: str, where: str) -> Any:
    """Load skops bytes holding a ``kind`` ("model" or "scaler"); refuse anything else.

    ``where`` names the file in every message. Nothing outside the trusted types is built.
    """
    import skops.io
    from skops.io.exceptions import UntrustedTypesFoundException

    if not zipfile.is_zipfile(io.BytesIO(data)):
        hint = " (a pickle, which runs code when loaded: refused)" if data[:1] == b"\x80" else ""
        raise ModelFormatError(f"{where} is not a skops file{hint}; re-run the pipeline to store it as skops")
    try:
        obj = skops.io.loads(data, trusted=list(TRUSTED_TYPES))  # checks every type before building any
    except UntrustedTypesFoundException:
        untrusted = ", ".join(sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES)))
        raise ModelFormatError(f"{where} holds types that are not trusted: {untrusted}; refused") from None
    except Exception as exc:  # skops raises many kinds for damaged files; each is a refusal here
        raise ModelFormatError(f"{where} is not a readable skops file ({type(exc).__name__}: {exc})") from exc
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name not in EXPECTED_TYPES[kind]:
        raise ModelFormatError(f"{where} holds a {name}, not a {kind} ({', '.join(EXPECTED_TYPES[kind])})")
    return obj


def _canonical(data: bytes) -> bytes:
    """skops names its array files and memo entries after ``id()`` of the objects, and stamps each
    zip entry with the current time: the same model gives new bytes in every process. The registry
    is content-addressed (a retrained, identical model is the same version; a signed manifest names
    each file's sha256), so the ids are renumbered in order of first appearance and the times fixed.
    Loading is unchanged: skops resolves both only against each other inside the file.

    The renumbering is a substitution on the schema's text, where skops writes these keys
    unescaped (the same text inside a string value would be escaped): a walk over the parsed
    schema and a new dump took 0.15 s for a 100-tree forest (1.5 MB of schema), this 0.01 s."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        schema = source.read("schema.json")
        arrays = {name: source.read(name) for name in source.namelist() if name != "schema.json"}
    numbers: dict[int, int] = {}

    def number(value: bytes) -> int:
        return numbers.setdefault(int(value), len(numbers) + 1)

    def renumber(match: re.Match[bytes]) -> bytes:
        if match.group(1) is not None:
            return b'"__id__": %d' % number(match.group(1))
        return b'"file": "%d.npy"' % number(match.group(2))

    schema = _IDS_IN_SCHEMA.sub(renumber, schema)
    renamed = {}
    for name, content in arrays.items():
        match = _MEMORY_ID.match(name)
        if not match or int(match.group(1)) not in numbers:
            raise ModelFormatError(f"skops wrote an entry this project does not know how to order: {name}")
        renamed[f"{numbers[int(match.group(1))]}.npy"] = content
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as target:
        for name, content in [("schema.json", schema), *sorted(renamed.items())]:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            target.writestr(info, content)
    return buffer.getvalue()

"""Nothing that travels (tasks, reports, weights, fingerprints) is ever unpickled.

A static scan (``ast``) of every Python file under ``fednnunet/`` and ``workers/``
for calls that can execute code while deserializing, plus runtime checks of the
two places where bytes from the network are decoded: Celery (JSON only) and the
weights codec (safetensors only).
"""

from __future__ import annotations

import ast
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fednnunet.adapters.broker import make_celery
from fednnunet.adapters.weights_codec import decode_weights, encode_weights
from fednnunet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("fednnunet", "workers")

# module -> attributes whose call deserializes with pickle (or another code-running format);
# "*" = the module must not be used at all.
UNSAFE_CALLS: dict[str, set[str]] = {
    "pickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"},
    "dill": {"*"},
    "cloudpickle": {"*"},
    "joblib": {"load"},
    "marshal": {"load", "loads"},
    "shelve": {"open", "Shelf", "DbfilenameShelf", "BsdDbShelf"},
    "torch": {"load"},
    "torch.serialization": {"load"},
    "pandas": {"read_pickle"},
    "yaml": {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"},
    "kombu.serialization": {"enable_insecure_serializers"},
}
BANNED_IMPORTS = {"dill", "cloudpickle"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
ACCEPT_KEYS = {"accept_content", "result_accept_content", "CELERY_ACCEPT_CONTENT"}
SERIALIZER_KEYS = {"serializer", "task_serializer", "result_serializer", "event_serializer"}
JSON_NAMES = {"json", "application/json"}
# Calls into nnU-Net that unpickle indirectly (torch.load weights_only=False). Each
# allowed use is listed with why the file cannot have come from another party.
INDIRECT_CALLS = {"load_checkpoint", "initialize_from_trained_model_folder", "load_pickle"}
INDIRECT_ALLOWED = {
    ("fednnunet/nnunet/session.py", "load_checkpoint"): "the worker's own local checkpoint",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> fully qualified name, from every import in the module."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _qualify(func: ast.AST, aliases: dict[str, str]) -> str | None:
    name = _dotted(func)
    if name is None:
        return None
    head, _, rest = name.partition(".")
    base = aliases.get(head, head)
    return f"{base}.{rest}" if rest else base


def _unsafe_call(qual: str) -> bool:
    for module, attrs in UNSAFE_CALLS.items():
        if qual == module and "*" in attrs:
            return True
        if qual.startswith(module + "."):
            attr = qual[len(module) + 1 :]
            if "*" in attrs or attr in attrs:
                return True
    return False


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    """Anything but an absent, False or None literal counts as maybe-true."""
    return node is not None and not (isinstance(node, ast.Constant) and node.value in (False, None))


def _json_only(node: ast.expr) -> bool:
    if not isinstance(node, (ast.List, ast.Tuple, ast.Set)) or not node.elts:
        return False
    return all(isinstance(e, ast.Constant) and e.value in JSON_NAMES for e in node.elts)


def _config_problem(key: str, value: ast.expr) -> str | None:
    if key in ACCEPT_KEYS and not _json_only(value):
        return f"{key} must be a literal ['json'], got {ast.unparse(value)}"
    if key in SERIALIZER_KEYS and not (
        isinstance(value, ast.Constant) and value.value in JSON_NAMES
    ):
        return f"{key} must be 'json', got {ast.unparse(value)}"
    return None


def scan_source(source: str, path: str = "<string>") -> list[Finding]:
    """Every place in ``source`` that can unpickle (or accepts non-JSON messages)."""
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree)
    found: list[Finding] = []

    def add(node: ast.AST, what: str) -> None:
        found.append(Finding(path, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for n in names:
                if n.split(".")[0] in BANNED_IMPORTS:
                    add(node, f"import of {n}")
        elif isinstance(node, ast.Call):
            qual = _qualify(node.func, aliases) or ""
            short = qual.rsplit(".", 1)[-1]
            weights_only = qual in {"torch.load", "torch.serialization.load"} and (
                isinstance(w := _kw(node, "weights_only"), ast.Constant) and w.value is True
            )
            if _unsafe_call(qual) and not weights_only:  # weights_only=True: no objects
                add(node, f"{qual}()")
            elif qual in {"numpy.load", "numpy.lib.npyio.load"} and _is_true(
                _kw(node, "allow_pickle")
            ):
                add(node, f"{qual}(allow_pickle=...)")
            elif qual in {"yaml.load", "yaml.load_all"}:
                loader = _kw(node, "Loader")
                if loader is None and len(node.args) > 1:
                    loader = node.args[1]
                name = (_dotted(loader) or "").rsplit(".", 1)[-1] if loader is not None else ""
                if name not in SAFE_YAML_LOADERS:
                    add(node, f"{qual}() without a safe Loader")
            elif short in INDIRECT_CALLS and (path, short) not in INDIRECT_ALLOWED:
                add(node, f"{short}() unpickles via nnU-Net (add to INDIRECT_ALLOWED with why)")
            elif short == "enable" and len(node.args) == 1:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and arg.value in {"pickle", "yaml", "msgpack"}:
                    add(node, f"serializer registry enable({arg.value!r})")
            for k in node.keywords:
                if k.arg and (problem := _config_problem(k.arg, k.value)):
                    add(node, problem)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(k, ast.Constant)
                    and isinstance(k.value, str)
                    and (problem := _config_problem(k.value, v))
                ):
                    add(node, problem)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                key = target.attr if isinstance(target, ast.Attribute) else None
                key = target.id if isinstance(target, ast.Name) else key
                if key and (problem := _config_problem(key, node.value)):
                    add(node, problem)
    return found


def python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))


# ---------------------------------------------------------------- the scan itself
def test_no_unpickling_anywhere_in_the_service_code():
    files = python_files()
    assert len(files) > 20 and any(p.name == "site_worker.py" for p in files)
    findings = [
        f
        for p in files
        for f in scan_source(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
    ]
    assert not findings, "unsafe deserialization:\n" + "\n".join(map(str, findings))


def test_indirect_allowlist_is_not_stale():
    """Each allowed nnU-Net loader call still exists (else the list hides nothing)."""
    for path, name in INDIRECT_ALLOWED:
        assert f".{name}(" in (REPO / path).read_text(), (path, name)


# ---------------------------------------------------------------- the scanner can fail
@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import torch\ntorch.load(x)", "torch.load()"),
        ("from torch import load as L\nL(x)", "torch.load()"),
        ("import pickle\npickle.loads(b)", "pickle.loads()"),
        ("import pickle as p\np.Unpickler(f).load()", "pickle.Unpickler()"),
        ("from pickle import load\nload(f)", "pickle.load()"),
        ("import numpy as np\nnp.load(f, allow_pickle=True)", "numpy.load(allow_pickle=...)"),
        ("import numpy\nnumpy.load(f, allow_pickle=flag)", "numpy.load(allow_pickle=...)"),
        ("import joblib\njoblib.load(f)", "joblib.load()"),
        ("import dill", "import of dill"),
        ("from cloudpickle import loads", "import of cloudpickle"),
        ("import marshal\nmarshal.loads(b)", "marshal.loads()"),
        ("import shelve\nshelve.open(p)", "shelve.open()"),
        ("import yaml\nyaml.load(s)", "yaml.load() without a safe Loader"),
        ("import yaml\nyaml.load(s, Loader=yaml.Loader)", "yaml.load() without a safe Loader"),
        ("import yaml\nyaml.unsafe_load(s)", "yaml.unsafe_load()"),
        ("import pandas as pd\npd.read_pickle(p)", "pandas.read_pickle()"),
        ("app.conf.update(accept_content=['json', 'pickle'])", "accept_content must be"),
        ("conf = {'accept_content': ['pickle']}", "accept_content must be"),
        ("app.conf.accept_content = ACCEPT", "accept_content must be"),
        ("make(task_serializer='pickle')", "task_serializer must be 'json'"),
        ("q.put(obj, serializer='pickle')", "serializer must be 'json'"),
        ("from kombu import serialization\nserialization.registry.enable('pickle')", "enable"),
        (
            "from kombu.serialization import enable_insecure_serializers as e\ne()",
            "enable_insecure_serializers()",
        ),
        ("trainer.load_checkpoint(path)", "load_checkpoint() unpickles via nnU-Net"),
    ],
)
def test_scanner_reports_unsafe_code(snippet, expected):
    findings = scan_source(snippet, "fednnunet/example.py")
    assert any(expected in f.what for f in findings), findings


@pytest.mark.parametrize(
    "snippet",
    [
        "import yaml\nyaml.safe_load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=False)",
        "import pickle\npickle.dumps(obj)",  # writing is not the risk
        "from safetensors.torch import load\nload(b)",
        "import json\njson.loads(s)",
        "app.conf.update(accept_content=['json'], task_serializer='json')",
        "CONF = {'result_accept_content': ('application/json',)}",
        "def load(x): ...\nload(1)",  # a local function named load
    ],
)
def test_scanner_accepts_safe_code(snippet):
    assert scan_source(snippet) == []


# ---------------------------------------------------------------- runtime checks
@pytest.mark.parametrize("role", ["site", "coordinator", "client"])
def test_every_celery_role_accepts_json_only(role):
    app = make_celery(Settings(), role, site_id="901")
    assert list(app.conf.accept_content) == ["json"]
    assert list(app.conf.result_accept_content) == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"


def test_celery_refuses_a_pickled_message():
    """What the worker's consumer does with a message's content type: pickle is refused."""
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads, prepare_accept_content

    app = make_celery(Settings(), "site", site_id="901")
    accept = prepare_accept_content(app.conf.accept_content)
    payload = pickle.dumps({"task": "x"})
    with pytest.raises(ContentDisallowed):
        loads(
            payload,
            "application/x-python-serialize",
            "binary",
            accept=accept,
        )
    assert loads(b'{"a": 1}', "application/json", "utf-8", accept=accept) == {"a": 1}


def _state() -> dict[str, torch.Tensor]:
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"encoder.w": w, "decoder.encoder.w": w, "head.b": torch.ones(2)}  # one alias


def test_weights_codec_writes_safetensors_not_pickle():
    data = encode_weights(_state(), metadata={"round": "3"})
    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header
    assert 0 < n < len(data) and data[8:9] == b"{"
    header = json.loads(data[8 : 8 + n])
    assert set(header) == {"__metadata__", "encoder.w", "head.b"}  # alias stored once
    assert header["encoder.w"]["dtype"] == "F32" and header["encoder.w"]["shape"] == [3, 4]
    assert header["__metadata__"]["round"] == "3"
    assert not data.startswith(b"\x80")  # pickle protocol 2+ opcode
    back = decode_weights(data)
    assert set(back) == set(_state()) and torch.equal(
        back["decoder.encoder.w"], _state()["encoder.w"]
    )


UNPICKLED: list[str] = []  # _mark_unpickled appends here whenever a pickle runs


def _mark_unpickled(tag: str) -> None:
    UNPICKLED.append(tag)


class _Boom:
    """Unpickling this calls ``_mark_unpickled``: proof that the payload's code ran."""

    def __reduce__(self):
        return (_mark_unpickled, ("ran",))


def test_boom_payload_runs_when_unpickled():
    """The oracle itself: plain pickle does run the payload (so the next test can fail)."""
    UNPICKLED.clear()
    pickle.loads(pickle.dumps({"w": _Boom()}))  # noqa: S301 - the point of this test
    assert UNPICKLED == ["ran"]
    UNPICKLED.clear()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_weights_codec_refuses_pickle_payloads(kind):
    """A pickle (even one that would run code) is rejected by the decoder, not run."""
    from fednnunet.adapters.weights_codec import MalformedWeights

    UNPICKLED.clear()
    if kind == "pickle":
        payload = pickle.dumps({"w": _Boom()})
    else:
        buf = io.BytesIO()
        torch.save({"encoder.w": torch.zeros(2), "boom": _Boom()}, buf)
        payload = buf.getvalue()
    with pytest.raises(MalformedWeights):
        decode_weights(payload)
    assert UNPICKLED == [], "decode_weights ran code from a pickle"

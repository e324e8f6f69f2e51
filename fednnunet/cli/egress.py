"""``fednnunet site egress``: show a hospital, in words, every object that left the site.

Reads the site's egress log (one JSON line per uploaded object, written by
``ArtifactStore``), fetches each object back from the store and checks that its sha256
is the one logged, so the audit shows what the coordinator can actually read.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import typer

from fednnunet.core.fingerprint_schema import describe_summary
from fednnunet.errors import FedError
from fednnunet.keys import experiment_prefix

site_app = typer.Typer(help="What this site runs and sends.", no_args_is_help=True)


def read_egress_log(path: Path, experiment: str | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FedError(f"no egress log at {path} (set FEDNNUNET_EGRESS_LOG or --log)")
    entries: list[dict[str, Any]] = []
    last_upload: dict[tuple[str, str], dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            raise FedError(f"{path}:{n}: not a JSON line") from None
        if experiment is not None and not str(e.get("key", "")).startswith(
            experiment_prefix(experiment)
        ):
            continue
        where = (str(e.get("bucket", "")), str(e.get("key", "")))
        if "deleted" in e:  # retention: the site deleted an object it uploaded earlier
            if where in last_upload:
                last_upload[where]["deleted"] = f"{e['deleted']}, {_when(e)}"
            continue
        entries.append(e)
        last_upload[where] = e
    return entries


def _when(entry: dict[str, Any]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("time", 0))))


DELETED = "deleted by this site"


def _deleted_status(entry: dict[str, Any]) -> str | None:
    """The audit status of an upload the site later deleted (None: not deleted)."""
    return f"{DELETED} ({entry['deleted']})" if "deleted" in entry else None


def status_is_ok(status: str) -> bool:
    """Whether an audit status agrees with the log (verified, not checked, or deleted)."""
    return status in ("verified", "not verified") or status.startswith(DELETED)


def _safetensors_words(data: bytes) -> str:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (struct.error, ValueError):
        return "binary object (not a readable safetensors file)"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    params = 0
    for v in tensors.values():
        p = 1
        for d in v.get("shape", []):
            p *= int(d)
        params += p
    return f"model weights: {len(tensors)} tensors, {params:,} parameters"


def describe_object(kind: str, data: bytes) -> list[str]:
    """The object's content in words: what a reader of the bucket learns from it."""
    if kind in ("weights_update", "global_weights") or data[:1] not in (b"{", b"["):
        return [_safetensors_words(data)]
    try:
        obj = json.loads(data)
    except ValueError:
        return [f"{len(data)} bytes, not JSON"]
    if kind == "fingerprint_summary" and isinstance(obj, dict):
        return describe_summary(obj)
    if kind == "plans" and isinstance(obj, dict):
        cfgs = ", ".join(sorted(obj.get("configurations", {})))
        return [f"nnU-Net plans (configurations {cfgs}; built from the merged fingerprint)"]
    text = json.dumps(obj, sort_keys=True)
    if len(text) <= 240:
        return [f"{kind.replace('_', ' ')}: {text}"]
    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else f"{len(obj)} items"
    return [f"{kind.replace('_', ' ')}: fields {keys}"]


def audit(entries: list[dict[str, Any]], store: Any) -> list[dict[str, Any]]:
    """Each entry with ``status`` (verified / MISMATCH / missing) and ``words``."""
    from fednnunet.adapters.s3_store import sha256_bytes

    out = []
    for e in entries:
        row = dict(e)
        try:
            ref = store.stat(e["bucket"], e["key"])
        except FedError as exc:
            row.update(status=f"unreadable ({exc})", words=[])
            out.append(row)
            continue
        if ref is None:
            row.update(status=_deleted_status(e) or "missing in store", words=[])
            out.append(row)
            continue
        data = store.client.get_object(e["bucket"], e["key"])
        try:
            blob = data.read()
        finally:
            data.close()
            data.release_conn()
        actual = sha256_bytes(blob)
        ok = actual == e.get("sha256") and len(blob) == e.get("bytes")
        row.update(
            status="verified" if ok else f"MISMATCH (store holds sha256 {actual[:12]}...)",
            words=describe_object(str(e.get("kind", "")), blob),
        )
        out.append(row)
    return out


@site_app.command("egress")
def site_egress(
    experiment: str = typer.Argument(None, help="only objects of this experiment"),
    log: Path = typer.Option(None, "--log", help="egress log (default: the site's own)"),
    site_id: str = typer.Option(None, "--site-id", help="env FEDNNUNET_SITE_ID"),
    no_verify: bool = typer.Option(False, "--no-verify", help="print the log only"),
) -> None:
    """Every object that left this site, in words, with its sha256 checked against the store."""
    from fednnunet.cli.main import clean_errors

    clean_errors(_site_egress)(experiment, log, site_id, no_verify)


def _site_egress(experiment, log, site_id, no_verify) -> None:
    from fednnunet.cli.main import console
    from fednnunet.settings import get_settings
    from fednnunet.workers.site_worker import default_egress_log  # where the worker writes

    settings = get_settings(**({"site_id": site_id} if site_id else {}))
    path = log or default_egress_log(settings)
    entries = read_egress_log(path, experiment)
    if not entries:
        console.print(f"nothing left this site{' for ' + experiment if experiment else ''}")
        return
    if no_verify:
        rows = [dict(e, status=_deleted_status(e) or "not verified", words=[]) for e in entries]
    else:
        from fednnunet.adapters.s3_store import ArtifactStore

        rows = audit(entries, ArtifactStore(settings))
    total = 0
    bad = 0
    for r in rows:
        total += int(r.get("bytes", 0))
        bad += not status_is_ok(r["status"])
        when = _when(r)
        console.print(
            f"{when}  {r.get('kind', '?')}  s3://{r['bucket']}/{r['key']}  "
            f"{r.get('bytes', '?')} B  {r['status']}",
            highlight=False,
        )
        for w in r["words"]:
            console.print(f"    {w}", highlight=False)
    console.print(f"{len(rows)} objects, {total:,} bytes left this site", highlight=False)
    if bad:
        raise FedError(f"{bad} logged object(s) do not match what the store holds")

"""The site's case log: one SQLite database (``cases.sqlite3``) with one row per decision.

``edge-demo serve --cases DIR`` writes it; ``edge-demo cases``, ``calibrate --cases`` and
``report`` read it. The folder is private (0700, files 0600). The database runs in WAL mode
with ``synchronous=FULL`` (a committed case survives a kill -9 and a power cut) and
``secure_delete`` on (a deleted case's bytes are overwritten, and the WAL is checkpointed
and truncated after a delete, so they are not left in either file). Its schema is versioned
(``PRAGMA user_version``) and upgraded in place by :data:`MIGRATIONS`.

Photos are kept only with ``--keep-photos`` and the case's ``consent_keep``: beside the
database in ``photos/<sha256>.<ext>``, written atomically before the row commits (a crash in
between leaves a file no row names, removed at the next open).

Without ``--cases`` the server still accepts each case id once, in a bounded in-memory
table (:class:`RecentCases`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermedge.files import write_bytes

from .caseid import is_case_id, normalize_short_code, short_code
from .errors import EdgeDemoError

log = logging.getLogger("edge_demo")

DB_FILE = "cases.sqlite3"
PHOTOS = "photos"
DIAGNOSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
OTHER = "other"
SOURCES: tuple[str, ...] = ("histopathology", "dermatologist", "follow-up")
_PHOTO_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

# Each entry upgrades the schema by one version; never edit a released entry, append one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the cases
    """
    CREATE TABLE cases (
        id TEXT PRIMARY KEY,
        code TEXT NOT NULL,
        created_at TEXT NOT NULL,
        client_created_at TEXT,
        site_id TEXT,
        tester_id TEXT,
        endpoint TEXT NOT NULL,
        tier_path TEXT NOT NULL,
        device_sha256 TEXT,
        cloud_sha256 TEXT,
        policy_sha256 TEXT NOT NULL,
        client_model_sha256 TEXT,
        client_policy_sha256 TEXT,
        device_computed_on TEXT,
        device_raw TEXT NOT NULL,
        cloud_raw TEXT,
        device_top TEXT,
        device_melanoma REAL,
        cloud_top TEXT,
        cloud_melanoma REAL,
        fallback_wanted INTEGER NOT NULL,
        fallback_used INTEGER NOT NULL,
        fallback_rules TEXT NOT NULL,
        decision TEXT NOT NULL,
        decided_by TEXT,
        advice_rules TEXT NOT NULL,
        gate TEXT,
        gate_passed INTEGER,
        device_ms REAL,
        cloud_ms REAL,
        total_ms REAL,
        client TEXT,
        build TEXT,
        runtime TEXT,
        queued INTEGER,
        patient TEXT,
        consent_upload INTEGER,
        consent_keep INTEGER,
        photo_received INTEGER NOT NULL,
        photo TEXT,
        response TEXT NOT NULL
    );
    CREATE INDEX cases_code ON cases(code);
    CREATE INDEX cases_created ON cases(created_at);
    """,
    # 2: the site's reference diagnoses
    """
    CREATE TABLE labels (
        case_id TEXT PRIMARY KEY REFERENCES cases(id) ON DELETE CASCADE,
        diagnosis TEXT NOT NULL,
        other TEXT,
        source TEXT NOT NULL,
        date TEXT NOT NULL,
        entered_at TEXT NOT NULL,
        entered_via TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class CaseFields:
    """What the request says about its case (the page's fields, or the server's defaults)."""

    id: str
    server_made: bool = False
    site_id: str | None = None
    tester_id: str | None = None
    consent_upload: bool | None = None
    consent_keep: bool | None = None
    client: dict[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None
    policy_sha256: str | None = None
    gate: dict[str, Any] | None = None

    @property
    def code(self) -> str:
        return short_code(self.id)

    def section(self, *, logged: bool, duplicate: bool) -> dict[str, Any]:
        """The response's ``case`` section."""
        return {"id": self.id, "code": self.code, "logged": logged, "duplicate": duplicate}


@dataclass(frozen=True)
class Label:
    """A reference diagnosis for one case, as the site lead enters it."""

    diagnosis: str
    source: str
    date: str
    other: str | None = None

    @classmethod
    def parse(cls, diagnosis: Any, source: Any, date: Any, other: Any = None) -> Label:
        """Checked fields; ``EdgeDemoError`` names the field and what it accepts."""
        dx = str(diagnosis or "").strip().lower()
        if dx not in (*DIAGNOSES, OTHER):
            raise EdgeDemoError(f"The diagnosis must be one of {', '.join(DIAGNOSES)} or"
                                f" '{OTHER}' (with its text); received {str(diagnosis)[:40]!r}.")
        text = " ".join(str(other or "").split())
        if dx == OTHER and not text:
            raise EdgeDemoError("A diagnosis of 'other' needs its text (e.g. 'seborrhoeic"
                                " wart'); give it in the 'other' field.")
        if len(text) > 200:
            raise EdgeDemoError("The 'other' diagnosis text is limited to 200 characters.")
        src = str(source or "").strip().lower()
        if src not in SOURCES:
            raise EdgeDemoError(f"The source must be one of {', '.join(SOURCES)}; received"
                                f" {str(source)[:40]!r}.")
        raw = str(date or "").strip()
        try:
            day = _dt.date.fromisoformat(raw)
        except ValueError:
            raise EdgeDemoError("The date must be the day of the reference diagnosis as"
                                f" YYYY-MM-DD; received {raw[:40]!r}.") from None
        if day > _dt.datetime.now(_dt.UTC).date() + _dt.timedelta(days=1):
            raise EdgeDemoError(f"The date {raw} is in the future; give the day the reference"
                                " diagnosis was made.")
        return cls(dx, src, day.isoformat(), text if dx == OTHER else None)

    def to_dict(self) -> dict[str, Any]:
        return {"diagnosis": self.diagnosis, "other": self.other, "source": self.source,
                "date": self.date}


class _Claims:
    """Case ids being answered right now: a second request for the same id waits for the
    first to finish, then reads its stored response (no second cloud run)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Event] = {}

    @contextlib.contextmanager
    def hold(self, case_id: str, timeout: float = 120.0) -> Iterator[None]:
        while True:
            with self._lock:
                event = self._busy.get(case_id)
                if event is None:
                    mine = self._busy[case_id] = threading.Event()
                    break
            event.wait(timeout)
        try:
            yield
        finally:
            with self._lock:
                del self._busy[case_id]
            mine.set()


class RecentCases:
    """Without a case log: each case id's first response, for the last ``size`` cases."""

    logged = False
    keep_photos = False

    def __init__(self, size: int = 2_000):
        self.size = int(size)
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.claims = _Claims()

    def first_response(self, case_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._seen.get(case_id)

    def add(self, case: CaseFields, response: dict[str, Any], **_: Any) -> bool:
        with self._lock:
            self._seen[case.id] = response
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return False

    def close(self) -> None:
        pass


def _private_dir(path: Path) -> Path:
    """Create ``path`` (0700), or tighten an existing one to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o700)
        log.warning("%s was readable by others (mode %o); set it to 0700.", path, mode)
    return path


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def _top(answer: dict[str, Any] | None) -> tuple[str | None, float | None]:
    if not answer:
        return None, None
    return answer["top"]["label"], float(answer["melanoma"])


class CaseLog:
    """The SQLite case log in ``folder``; safe to use from the server's worker threads."""

    logged = True

    def __init__(self, folder: str | Path, *, keep_photos: bool = False,
                 create: bool = True):
        self.folder = Path(folder).expanduser()
        self.keep_photos = bool(keep_photos)
        self.path = self.folder / DB_FILE
        if not create and not self.path.is_file():
            raise EdgeDemoError(f"No case log at {self.path}. Pass the folder given to"
                                " `edge-demo serve --cases DIR`.")
        _private_dir(self.folder)
        new = not self.path.exists()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise EdgeDemoError(f"Cannot open the case log {self.path} ({exc}).") from exc
        if new:
            os.chmod(self.path, 0o600)
        self._lock = threading.RLock()
        self.claims = _Claims()
        self._db.row_factory = sqlite3.Row
        try:
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON",
                           "foreign_keys=ON", "busy_timeout=10000"):
                self._db.execute(f"PRAGMA {pragma}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise EdgeDemoError(f"{self.path} is not a readable case log ({exc}).") from exc
        self.photos = self.folder / PHOTOS
        if self.photos.is_dir():
            self._remove_orphan_photos()

    # --- schema -----------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            have = self.version
            if have > SCHEMA_VERSION:
                raise EdgeDemoError(
                    f"{self.path} has case-log schema version {have}; this edge-demo knows up"
                    f" to {SCHEMA_VERSION}. Use the newer edge-demo that wrote it.")
            for v in range(have, SCHEMA_VERSION):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[v].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {v + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing cases -------------------------------------------------------------------
    def first_response(self, case_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM cases WHERE id = ?",
                                   (case_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _save_photo(self, data: bytes) -> str:
        """``photos/<sha256>.<ext>``, written and synced before the row that names it."""
        from PIL import Image

        try:
            import io

            fmt = Image.open(io.BytesIO(data)).format
        except Exception:  # noqa: BLE001 - the decode already refused anything unreadable
            fmt = None
        name = f"{hashlib.sha256(data).hexdigest()}.{_PHOTO_EXT.get(fmt, 'bin')}"
        _private_dir(self.photos)
        dest = self.photos / name
        if dest.exists():
            return name
        write_bytes(dest, data, mode=0o600, durable=True)  # on disk before the row commits
        return name

    def add(self, case: CaseFields, response: dict[str, Any], *, endpoint: str,
            raw: dict[str, Any], photo: bytes | None = None,
            patient: dict[str, Any] | None = None) -> bool:
        """Log one decision (one commit). ``raw`` holds the tiers' model outputs (before the
        policy's temperature and the patient fields); ``photo`` is kept only with
        ``--keep-photos`` and the case's consent_keep. False when the id is already logged."""
        device, cloud = response.get("device"), response.get("cloud")
        fallback, advice = response.get("fallback") or {}, response.get("advice") or {}
        models = response.get("models") or {}
        gate = response.get("gate") or case.gate
        timings = response.get("timings_ms") or {}
        name = None
        if photo and self.keep_photos and case.consent_keep:
            name = self._save_photo(photo)
        client = case.client or {}
        row = {
            "id": case.id, "code": case.code, "created_at": utc_now(),
            "client_created_at": client.get("created_at"),
            "site_id": case.site_id, "tester_id": case.tester_id, "endpoint": endpoint,
            "tier_path": response.get("tier_path") or "",
            "device_sha256": (models.get("device") or {}).get("sha256"),
            "cloud_sha256": (models.get("cloud") or {}).get("sha256")
            if cloud is not None else None,
            "policy_sha256": models.get("policy_sha256") or "",
            "client_model_sha256": case.model_sha256,
            "client_policy_sha256": case.policy_sha256,
            "device_computed_on": (device or {}).get("computed_on", "server"),
            # JSON null when there is no device output (a photo the page's input gate refused)
            "device_raw": _json(raw.get("device")) or "null", "cloud_raw": _json(raw.get("cloud")),
            "device_top": _top(device)[0], "device_melanoma": _top(device)[1],
            "cloud_top": _top(cloud)[0], "cloud_melanoma": _top(cloud)[1],
            "fallback_wanted": int(bool(fallback.get("wanted"))),
            "fallback_used": int(bool(fallback.get("used"))),
            "fallback_rules": _json(fallback.get("rules_fired") or []),
            "decision": advice.get("decision") or "",
            "decided_by": advice.get("decided_by"),
            "advice_rules": _json(advice.get("rules_fired") or []),
            "gate": _json(gate),
            "gate_passed": None if not gate or gate.get("passed") is None
            else int(bool(gate.get("passed"))),
            "device_ms": (device or {}).get("latency_ms"), "cloud_ms": (cloud or {}).get(
                "latency_ms"), "total_ms": timings.get("total"),
            "client": _json(client or None), "build": client.get("build"),
            "runtime": client.get("runtime"),
            "queued": None if client.get("queued") is None else int(bool(client["queued"])),
            "patient": _json(patient), "consent_upload": None if case.consent_upload is None
            else int(case.consent_upload), "consent_keep": None if case.consent_keep is None
            else int(case.consent_keep),
            "photo_received": int(bool(photo)), "photo": name,
            "response": _json(response),
        }
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._transaction() as db:
            # only a repeated id is ignored; any other constraint failure raises, and the
            # answer then says logged: false
            cur = db.execute(f"INSERT INTO cases ({cols}) VALUES ({marks})"
                             " ON CONFLICT(id) DO NOTHING", tuple(row.values()))
            return cur.rowcount == 1

    # --- reading ------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """A case id from a full id or a short code; ``EdgeDemoError`` when none or several."""
        text = str(ref or "").strip()
        if is_case_id(text.lower()):
            case_id = text.lower()
            with self._lock:
                hit = self._db.execute("SELECT id FROM cases WHERE id = ?",
                                       (case_id,)).fetchone()
            if hit is None:
                raise EdgeDemoError(f"No case {case_id} in {self.path}.")
            return case_id
        code = normalize_short_code(text)
        if code is None:
            raise EdgeDemoError(f"{text[:40]!r} is not a case code: type the XXXX-XXXX code the"
                                " page showed (or the full case id).")
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM cases WHERE code = ?",
                                                  (code,))]
        if not ids:
            raise EdgeDemoError(f"No case with the code {code} in this case log; check the"
                                " code the page showed.")
        if len(ids) > 1:
            raise EdgeDemoError(f"{len(ids)} cases share the code {code}; use the full case id"
                                f" ({', '.join(ids)}).")
        return ids[0]

    def cases(self, *, limit: int | None = None, with_response: bool = False
              ) -> list[dict[str, Any]]:
        """Cases with their label, newest first."""
        cols = "c.*" if with_response else ", ".join(
            f"c.{c}" for c in self._columns() if c != "response")
        sql = (f"SELECT {cols}, l.diagnosis AS label_diagnosis, l.other AS label_other,"
               " l.source AS label_source, l.date AS label_date, l.entered_at AS label_entered_at"
               " FROM cases c LEFT JOIN labels l ON l.case_id = c.id"
               " ORDER BY c.created_at DESC, c.id")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = [dict(r) for r in self._db.execute(sql)]
        for r in rows:
            for k in ("device_raw", "cloud_raw", "fallback_rules", "advice_rules", "gate",
                      "client", "patient", "response"):
                if r.get(k) is not None:
                    r[k] = json.loads(r[k])
        return rows

    def _columns(self) -> list[str]:
        with self._lock:
            return [r[1] for r in self._db.execute("PRAGMA table_info(cases)")]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM cases").fetchone()[0])

    def photo_path(self, case_id: str) -> Path | None:
        with self._lock:
            row = self._db.execute("SELECT photo FROM cases WHERE id = ?",
                                   (case_id,)).fetchone()
        return self.photos / row[0] if row and row[0] else None

    # --- labels -------------------------------------------------------------------------
    def set_labels(self, items: Sequence[tuple[str, Label]], via: str) -> int:
        """Store reference diagnoses (case id, label), all in one commit; returns how many."""
        now = utc_now()
        with self._transaction() as db:
            for case_id, lab in items:
                db.execute(
                    "INSERT INTO labels (case_id, diagnosis, other, source, date, entered_at,"
                    " entered_via) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(case_id) DO UPDATE"
                    " SET diagnosis = excluded.diagnosis, other = excluded.other,"
                    " source = excluded.source, date = excluded.date,"
                    " entered_at = excluded.entered_at, entered_via = excluded.entered_via",
                    (case_id, lab.diagnosis, lab.other, lab.source, lab.date, now, via))
        return len(items)

    # --- deleting -----------------------------------------------------------------------
    def delete(self, case_ids: Sequence[str]) -> int:
        """Delete cases, their labels and their photos; the freed pages are zeroed
        (secure_delete) and the WAL is checkpointed and truncated, so no copy is left."""
        with self._transaction() as db:
            photos = set()
            n = 0
            for case_id in case_ids:
                row = db.execute("SELECT photo FROM cases WHERE id = ?", (case_id,)).fetchone()
                if row is None:
                    continue
                if row[0]:
                    photos.add(row[0])
                n += db.execute("DELETE FROM cases WHERE id = ?", (case_id,)).rowcount
            still = {r[0] for r in db.execute(
                "SELECT photo FROM cases WHERE photo IS NOT NULL")} if photos else set()
        for name in photos - still:
            (self.photos / name).unlink(missing_ok=True)
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def _remove_orphan_photos(self) -> None:
        with self._lock:
            named = {r[0] for r in self._db.execute(
                "SELECT photo FROM cases WHERE photo IS NOT NULL")}
        for p in self.photos.iterdir():
            if p.is_file() and p.name not in named:
                p.unlink(missing_ok=True)


# --- CSV: `edge-demo cases export` and `cases import` ---------------------------------------
EXPORT_COLUMNS: tuple[str, ...] = (
    "case_id", "code", "created_at", "client_created_at", "site_id", "tester_id", "endpoint",
    "tier_path", "decision", "decided_by", "advice_rules", "fallback_wanted", "fallback_used",
    "fallback_rules", "gate_passed", "device_top", "device_top_p", "device_melanoma",
    "device_computed_on", "cloud_top", "cloud_top_p", "cloud_melanoma", "device_raw_top",
    "device_raw_melanoma", "cloud_raw_top", "cloud_raw_melanoma", "device_ms", "cloud_ms",
    "total_ms", "build", "runtime", "queued", "age", "sex", "site", "consent_upload",
    "consent_keep", "photo_received", "photo_kept", "policy_sha256", "device_sha256",
    "cloud_sha256", "label_diagnosis", "label_other", "label_source", "label_date")
LABEL_COLUMNS = ("case", "diagnosis", "other", "source", "date")


def _raw_top(raw: dict[str, Any] | None) -> tuple[str, str]:
    if not raw:
        return "", ""
    diag = raw["diagnosis"]
    best = max(diag, key=diag.__getitem__)
    return best, f"{float(raw['melanoma']):.6f}"


def export_rows(log: CaseLog) -> list[dict[str, Any]]:
    """One flat row per case, oldest first: the labels and both tiers' answers."""
    out = []
    for r in reversed(log.cases(with_response=True)):
        resp = r.get("response") or {}
        dev, cl = resp.get("device") or {}, resp.get("cloud") or {}
        patient = r.get("patient") or {}
        d_top, d_mel = _raw_top(r.get("device_raw"))
        c_top, c_mel = _raw_top(r.get("cloud_raw"))
        row = {k: r.get(k) for k in EXPORT_COLUMNS if k in r}
        row.update(
            case_id=r["id"], advice_rules=" ".join(r.get("advice_rules") or []),
            fallback_rules=" ".join(r.get("fallback_rules") or []),
            device_top_p=(dev.get("top") or {}).get("probability"),
            cloud_top_p=(cl.get("top") or {}).get("probability"),
            device_raw_top=d_top, device_raw_melanoma=d_mel, cloud_raw_top=c_top,
            cloud_raw_melanoma=c_mel, age=patient.get("age"), sex=patient.get("sex"),
            site=patient.get("site"), photo_kept=int(bool(r.get("photo"))))
        out.append({k: ("" if row.get(k) is None else row[k]) for k in EXPORT_COLUMNS})
    return out


def export_csv(log: CaseLog, stream) -> int:
    import csv

    rows = export_rows(log)
    w = csv.DictWriter(stream, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return len(rows)


def read_labels(path: str | Path, log: CaseLog) -> list[tuple[str, Label]]:
    """``labels.csv`` (columns case, diagnosis, other, source, date; ``case`` is the short code
    or the full id), every row checked before any is stored; the error lists each bad row."""
    import csv

    p = Path(path).expanduser()
    if not p.is_file():
        raise EdgeDemoError(f"Labels file not found: {p}. Write a CSV with the columns"
                            f" {', '.join(LABEL_COLUMNS)}.")
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = [c for c in LABEL_COLUMNS if c not in fields and c != "other"]
        if missing:
            raise EdgeDemoError(f"{p} lacks the columns {missing} (found {fields}). Expected"
                                f" {', '.join(LABEL_COLUMNS)} ('other' only for diagnosis"
                                " other).")
        rows = [{(k or "").strip().lower(): (v or "") for k, v in r.items()} for r in reader]
    items, problems, seen = [], [], {}
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        try:
            case_id = log.resolve(r["case"])
            label = Label.parse(r["diagnosis"], r["source"], r["date"], r.get("other"))
        except EdgeDemoError as exc:
            problems.append(f"row {i}: {exc}")
            continue
        if case_id in seen:
            problems.append(f"row {i}: the case {r['case']} is also on row {seen[case_id]}")
            continue
        seen[case_id] = i
        items.append((case_id, label))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if
                                             len(problems) > 10 else "")
        raise EdgeDemoError(f"{p}: {len(problems)} of {len(rows)} rows cannot be used, so none"
                            f" was imported: {shown}")
    if not items:
        raise EdgeDemoError(f"{p} has no label rows.")
    return items

"""Case ids: the page's caseid.js and edge_demo.caseid agree on one table (ids made here and
in Node), and a short code typed by a person maps back to the stored form."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
from ci import unavailable

from edge_demo.caseid import (
    CROCKFORD,
    is_case_id,
    new_case_id,
    normalize_short_code,
    short_code,
)
from edge_demo.policy import RULES_FILE

CASEID_JS = RULES_FILE.with_name("caseid.js")
FIXED = ["00000000-0000-4000-8000-000000000000", "ffffffff-ffff-4fff-bfff-ffffffffffff",
         "0123abcd-ef01-4234-9678-9abcdef01234"]
DRIVER = r"""
const C = require(process.argv[1]);
const nodeCrypto = require("crypto").webcrypto;
const ids = JSON.parse(require("fs").readFileSync(0, "utf8"));
const made = [];
for (let i = 0; i < 50; i++) made.push(C.newCaseId(nodeCrypto));
// without randomUUID (an insecure context): getRandomValues only
const plain = { getRandomValues: (a) => nodeCrypto.getRandomValues(a) };
for (let i = 0; i < 50; i++) made.push(C.newCaseId(plain));
const all = ids.concat(made);
process.stdout.write(JSON.stringify(all.map((id) => [id, C.isCaseId(id), C.shortCode(id)])));
"""


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        unavailable("node not found: install Debian nodejs (apt-get install nodejs)")
    return node


def test_short_code_of_known_ids():
    assert short_code(FIXED[0]) == "0000-0000"
    assert short_code(FIXED[1]) == "ZZZZ-ZZZZ"
    # 0x0123abcdef = 4888186351: its base32 digits, most significant first
    n, digits = 0x0123ABCDEF, []
    for _ in range(8):
        digits.append(CROCKFORD[n % 32])
        n //= 32
    code = "".join(reversed(digits))
    assert short_code(FIXED[2]) == code[:4] + "-" + code[4:]


def test_ids_are_uuid4_and_bad_ids_are_refused():
    ids = {new_case_id() for _ in range(200)}
    assert len(ids) == 200 and all(is_case_id(i) and uuid.UUID(i).version == 4 for i in ids)
    for bad in ("", "ABCDEF01-0000-4000-8000-000000000000", str(uuid.uuid1()), "x" * 36, None):
        assert not is_case_id(bad)
    with pytest.raises(ValueError, match="not a case id"):
        short_code("0000")


def test_typed_short_codes_normalize():
    code = short_code(FIXED[2])
    assert normalize_short_code(code.lower()) == code
    assert normalize_short_code(code.replace("-", " ")) == code
    assert normalize_short_code("oooo-iiii") == "0000-1111"
    assert normalize_short_code("ABC") is None and normalize_short_code("UUUU-UUUU") is None


def test_js_and_python_agree_on_ids_and_short_codes():
    proc = subprocess.run([_node(), "-e", DRIVER, str(CASEID_JS)], input=json.dumps(FIXED),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == len(FIXED) + 100
    assert len({r[0] for r in rows}) == len(rows)
    for case_id, ok, code in rows:
        assert ok and is_case_id(case_id), case_id
        assert code == short_code(case_id), case_id

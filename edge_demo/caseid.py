"""Case ids, made on the phone: one id names a case in the page's queue, the API and the case log.

A case id is a random UUID (version 4, lower-case), made by the page (``static/caseid.js``) when
the tester takes the photo, so a case answered offline and sent later keeps its id and is
logged once. Its short code (the first 40 bits in Crockford base32, ``XXXX-XXXX``) is what the
page shows the tester and what a site lead types when entering a reference diagnosis.
"""

from __future__ import annotations

import re
import uuid

CASE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SHORT_CODE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}$")


def new_case_id() -> str:
    """A fresh case id (for cases that start on the server: the API without a case id)."""
    return str(uuid.uuid4())


def is_case_id(value: object) -> bool:
    return isinstance(value, str) and CASE_ID.match(value) is not None


def short_code(case_id: str) -> str:
    """``XXXX-XXXX``: the id's first 40 bits in Crockford base32 (no I, L, O, U)."""
    if not is_case_id(case_id):
        raise ValueError(f"not a case id (a lower-case UUID version 4): {case_id!r}")
    bits = int(case_id.replace("-", "")[:10], 16)
    chars = [CROCKFORD[(bits >> (5 * i)) & 31] for i in range(7, -1, -1)]
    return "".join(chars[:4]) + "-" + "".join(chars[4:])


def normalize_short_code(text: str) -> str | None:
    """A typed short code as stored (upper case, one hyphen; O->0, I/L->1 as Crockford reads
    them), or None when it cannot be one."""
    t = re.sub(r"[\s-]", "", str(text)).upper().translate(str.maketrans("OIL", "011"))
    code = f"{t[:4]}-{t[4:]}" if len(t) == 8 else t
    return code if SHORT_CODE.match(code) else None

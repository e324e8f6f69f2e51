"""What a site's error text may say when it leaves the hospital.

nnU-Net and our own dataset checks quote case identifiers, file names and paths
("case case_0007 lacks channel 1", ".../imagesTr/case_0007_0000.nii.gz"). The full
text stays in the site's own log; the copy sent to the coordinator names no case,
no file and no path (issue 13: what other parties read holds nothing per case).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CASE = "<case>"
FILE = "<file>"
PATH = "<path>"

# An absolute POSIX or Windows path, up to the next whitespace or quote.
_ABS_PATH = re.compile(r"""(?:(?<![\w.])/|\b[A-Za-z]:\\)[^\s'"`,;:()\[\]{}]*""")
# A file name with an image, array or nnU-Net data extension (case data, whatever its name).
_DATA_FILE = re.compile(
    r"""(?<![\w.-])[A-Za-z0-9][^\s'"`/\\,;:()\[\]{}]*\.(?:nii\.gz|nii|nrrd|nhdr|mha|mhd|tiff?|png|dcm|npz|npy|b2nd|pkl|h5)\b""",
    re.IGNORECASE,
)


def redact_error(text: str, case_ids: Iterable[str] = ()) -> str:
    """``text`` without absolute paths, data file names or any of ``case_ids``.

    Case identifiers are replaced wherever they stand as a token (not inside a longer
    identifier), longest first, so ``case_1`` does not leave ``<case>0`` of ``case_10``.
    """
    out = _ABS_PATH.sub(PATH, text)
    out = _DATA_FILE.sub(FILE, out)
    for case in sorted({c for c in case_ids if c}, key=len, reverse=True):
        out = re.sub(rf"(?<![A-Za-z0-9]){re.escape(case)}(?![A-Za-z0-9])", CASE, out)
    return out

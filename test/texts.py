"""Texts the tests embed: the user's README query and documents (from the user's own test script,
which stays verbatim), and awkward ones."""

import runpy
from pathlib import Path

_user_script = runpy.run_path(str(Path(__file__).with_name("test-nv-embed-v2.py")))  # its main() does not run
QUERY: str = _user_script["QUERY"]
DOCUMENTS: list[str] = _user_script["DOCUMENTS"]
AWKWARD = ["Ünïcödé, 中文, emoji 🙂 and\ttabs\nnewlines.", "x"]

"""FlatBuffers test schema (user.fbs) and its flatc-generated Python code (User.py).

Regenerate from the repository root with flatc 2.x or later::

    flatc --python --gen-object-api -o /tmp/fbsgen tests/fbs/user.fbs
    (echo "# ruff: noqa"; cat /tmp/fbsgen/tests/fbs/User.py) > tests/fbs/User.py
"""

"""`import lmshard` stays cheap: numpy and flatbuffers load only once a feature needs them.

Each check runs in a fresh interpreter, since this test process has imported numpy already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Modules that only some features need (numpy: ~50-130 ms to import; flatbuffers imports numpy).
HEAVY = ("numpy", "flatbuffers")


def run(code: str) -> str:
    """Run ``code`` in a fresh interpreter with ``loaded(*names)`` defined; return its stdout."""
    prelude = "import sys\ndef loaded(*names): return [n for n in names if n in sys.modules]\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "code",
    [
        "import lmshard",
        "import lmshard; lmshard.connect; lmshard.open; lmshard.Client; lmshard.Writer",
        """
        import lmshard
        schema = lmshard.Schema("svc")
        users = schema.table("users", table_id="5a3c8f1e-2b0d-4c39-9a7e-1f6d2c4b8e01",
                             key="uuid", value="cbor")
        users.index("by_email", lambda v: v["email"], unique=True)
        schema.table("events", table_id="9b1e7d2c-4a5f-4e8b-8c3d-2e7f1a6b9c02",
                     key=("str", "timestamp"), value="msgpack")
        lmshard.get_codec("json"); lmshard.get_codec("bytes")
        """,
        "from lmshard import flatbuffers_codec, get_codec, register_codec, Codec",
        "from lmshard.codecs import codec_names; assert 'numpy' in codec_names()",
        "import lmshard.timeseries",
        "from lmshard.scaled import scaled_codec; scaled_codec(8).dumps('1.5')",
    ],
    ids=[
        "import",
        "client-attrs",
        "schema",
        "import-names",
        "codec-list",
        "timeseries-module",
        "scaled-codec",
    ],
)
def test_import_leaves_heavy_modules_out(code: str) -> None:
    out = run(textwrap.dedent(code) + f"\nprint(loaded(*{HEAVY!r}))")
    assert out.strip() == "[]", f"imported by {code.strip()!r}: {out.strip()}"


def test_numpy_codec_imports_numpy_on_first_use() -> None:
    out = run("""
        import lmshard
        codec = lmshard.get_codec("numpy")
        print(loaded("numpy"))
        import numpy as np
        arr = np.arange(6, dtype="<i4").reshape(2, 3)
        assert (codec.loads(codec.dumps(arr)) == arr).all()
        print("ok")
    """)
    assert out.split() == ["['numpy']", "ok"]


def test_flatbuffers_codec_still_works() -> None:
    out = run("""
        import lmshard
        print(loaded("flatbuffers"))
        from tests.fbs.User import User, UserT
        codec = lmshard.flatbuffers_codec(User)
        user = UserT()
        user.id, user.name = 7, "Ada"
        back = codec.loads(codec.dumps(user))
        assert (back.Id(), back.Name()) == (7, b"Ada")
        print("ok")
    """)
    assert out.split() == ["[]", "ok"]


def test_timeseries_imports_numpy_when_used(tmp_path: Path) -> None:
    out = run(f"""
        import lmshard
        from lmshard.timeseries import Points, TimeSeries
        print(loaded("numpy"))
        schema = lmshard.Schema("ts")
        prices = TimeSeries(schema, "prices", table_id="0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5",
                            chunk_rows=4)
        print(loaded("numpy"))
        with lmshard.open({str(tmp_path / "store")!r}, schema) as store:
            assert prices.append(store, "BTC", [1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0]) == 5
            assert prices.append(store, "BTC", [6, 7], [6.0, 7.0]) == 2  # fills the tail chunk
            ts, vs = prices.range(store, "BTC", 2, 7)
            assert ts.tolist() == [2, 3, 4, 5, 6] and vs.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
            ts, vs = prices.downsample(store, "BTC", 0, 8, 4, "sum")
            assert ts.tolist() == [0, 4] and vs.tolist() == [6.0, 22.0]
        print("ok")
    """)
    assert out.split() == ["[]", "['numpy']", "ok"]

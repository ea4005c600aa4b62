"""Print config/lmshard.toml: the built-in defaults, every key under its doc, the keys unset by
default shown commented out. Rendered from the declarations so it cannot drift:

    python -m lmshard.config.example > config/lmshard.toml
"""

from __future__ import annotations

from pathlib import Path

from lmshard.config.model import PORT_SETTINGS, make_config
from lmshard.config.settings import WriteContext
from lmshard.config.writing import render_toml

HEADER = """\
lmshard default configuration: 4 shards under ./var, everything on one host over ipc.

Which file is used (first match wins): the --config argument, the LMSHARD_CONFIG environment \
variable, config/lmshard.toml under the current directory.

Relative paths (data_dir, run_dir, python_path, [curve] keys) are relative to the directory \
this file is in (config/), not to the current directory: "../var/data" is <repo>/var/data.

Sizes are an integer number of bytes or a string with a unit: "64MiB", "1GiB", "512KiB", \
"10MB", "4096". KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000; units are \
case-insensitive. A key left out takes the value shown here (paths: var/data and var/run next \
to the file); a key shown commented out is unset unless given. Unknown keys are an error, so a \
typo never goes unnoticed.

This file is generated from the declarations in lmshard/config/model.py:
    python -m lmshard.config.example > config/lmshard.toml"""

_REPO = Path("/lmshard")
"""Where the rendering pretends the repository is: only paths relative to config/ are written."""


def render_default_file() -> str:
    """The text of config/lmshard.toml."""
    config = make_config(base_dir=_REPO)
    return render_toml(config, WriteContext(_REPO / "config", config.run_dir), header=HEADER,
                       unset=PORT_SETTINGS, example=True)


if __name__ == "__main__":
    print(render_default_file(), end="")

"""``python -m lmshard.protocol > docs/protocol.md``: print the generated protocol document."""

from __future__ import annotations

import sys

from lmshard.protocol.docs import render_markdown

sys.stdout.write(render_markdown())

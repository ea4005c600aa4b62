"""Online re-sharding: ``lmshard reshard`` moves slot ranges between running shard owners.

- ``plan``: which slots go where (``--shards M`` grows or shrinks, ``--move FIRST-LAST --to N``
  moves one range), as a list of moves of one source and one destination each.
- ``state``: the state file ``<run_dir>/reshard.json`` (the plan, the move under way and its
  phase), written before each phase, so an interrupted re-shard resumes or rolls back.
- ``admin``: the command's connection to the owners (``slot_state``, ``move_rows``).
- ``mover``: one move, step by step (docs/resharding.md).
- ``service``: the config file and supervisord while shards are added or removed.
- ``run``: a whole re-shard: start, resume, roll back, status.
"""

from lmshard.errors import Error


class ReshardError(Error):
    """A re-shard that cannot start or go on; the message says why and what to do."""

    hint = "`lmshard reshard --status` shows where it stands"

"""What operators run, apart from what services import: the ``lmshard`` CLI and its commands,
supervisord generation and control, backup coordination, ``top``, the demo, and the templates
they need (package data). A service never imports this package."""

"""What runs on top of the flows: the ``sora2`` command line and the demo.

``sora2.cli`` is the entry point; the parser's flags come from
``sora2.arguments``, the commands from ``sora2.commands``, what they print
from ``sora2.output``.
"""

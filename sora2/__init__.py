"""The command line on top of the flows: the demo now, the ``sora2`` tool later."""

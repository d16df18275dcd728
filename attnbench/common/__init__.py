"""What several layers share, below all of them: imports nothing else of attnbench.

- :mod:`.versions`: the package version and the versions every saved artefact records;
- :mod:`.environment`: how a number was made (device, libraries, git revision, command);
- :mod:`.paths`: where attnbench's own checkout lies;
- :mod:`.dist`: torchrun's processes, or one process when there is no torchrun;
- :mod:`.names`: suggestions for a misspelt name in an error message;
- :mod:`.capabilities`: what a fast path needs, as data (dtypes by name) and its reasons;
- :mod:`.catalogue`: the built-in attention methods as ``attnbench list`` shows them,
  read from ``catalogue.json`` without importing torch.

The layers above import from here: attention → models → bench / metrics / distill →
report → pipeline (and the top-level commands), each only downwards.
"""
